"""Where a run continues from a checkpoint, and what it restores on the way there.

A checkpoint is written at one of three moments, and each says where the random streams
(`rng_state`) must be put back for the resumed run to draw what the uninterrupted one drew:

- at the end of a stage: the next stage starts afresh, with the streams restored *before*
  its setup (which draws nothing today: cached features are computed or read from the shared
  store under `fork_rng`, so a store hit and a miss leave the streams alike; restoring first
  keeps resume exact should a setup ever draw);
- at the end of an epoch inside a stage: that stage is set up again, then its optimizer,
  scheduler, scaler and patience count are restored and the streams restored *after* setup;
- at a pause inside an epoch: as at an epoch's end, except that the paused epoch itself
  restores the streams, when it replays its batch order and skips the batches it trained.
"""

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader

from .checkpoint import load_checkpoint, param_group_layout, restore_rng, rng_state
from .ema import WeightAverage
from .loop import EpochPosition, EpochResult
from .model import TransferModel
from .optim import EarlyStopping
from .plan import Plan

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PausedEpoch:
    """An epoch paused after `steps` training steps."""

    steps: int
    loss_sum: float
    """The training loss of those steps, summed over their samples."""
    samples: int
    epoch_start_rng: dict[str, Any]
    """The random streams before the epoch drew its batch order."""
    rng_at_pause: dict[str, Any]

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> "PausedEpoch":
        partial = state["partial"]
        return cls(
            steps=partial["steps"],
            loss_sum=partial["loss_sum"],
            samples=partial["samples"],
            epoch_start_rng=partial["epoch_start_rng"],
            rng_at_pause=state["rng"],
        )

    def remaining_batches(
        self, batches: DataLoader[Any], shuffle: torch.Generator
    ) -> Iterator[Any]:
        """The batches the epoch had left, in the order the paused run drew."""
        # The iterator draws the epoch's batch order (on cached features, each pass's as the pass
        # starts) from the shuffle stream, so it is drawn again from where the epoch began; the
        # batches done before the pause are passed over (their images still load, but nothing
        # trains) and the streams then set to where the pause left them, which includes the
        # dropout draws of those steps and the orders of the passes drawn so far.
        restore_rng(self.epoch_start_rng, shuffle)
        remaining = iter(batches)
        for _ in range(self.steps):
            next(remaining)
        restore_rng(self.rng_at_pause, shuffle)
        return remaining

    def position(self, device: torch.device) -> EpochPosition:
        return EpochPosition(self.steps, torch.tensor(self.loss_sum, device=device), self.samples)


@dataclass(frozen=True)
class StageTrainingState:
    """What a stage's setup creates afresh and a checkpoint inside the stage had moved on."""

    param_groups: list[dict[str, Any]]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    epochs_without_improvement: int
    ema: dict[str, Any] | None
    """The weight average so far in the stage (plans with `ema`)."""

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> "StageTrainingState":
        return cls(
            param_groups=state["param_groups"],
            optimizer=state["optimizer"],
            scheduler=state["scheduler"],
            scaler=state["scaler"],
            epochs_without_improvement=state["early_stopping"]["epochs_without_improvement"],
            ema=state.get("ema"),
        )


@dataclass(frozen=True)
class StageStart:
    """How `run` begins a stage: afresh (the defaults), or part-way as a checkpoint left it."""

    first_epoch: int = 1
    rng_before_setup: dict[str, Any] | None = None
    """Set when the checkpoint ended the previous stage."""
    training: StageTrainingState | None = None
    """Set when the checkpoint was written inside this stage; restored after setup."""
    rng_after_setup: dict[str, Any] | None = None
    """Set when that checkpoint ended an epoch."""
    paused: PausedEpoch | None = None
    """Set when it was written at a pause inside `first_epoch`."""
    source: Path | None = None
    """The checkpoint, for error messages."""

    def restore_before_setup(self, shuffle: torch.Generator) -> None:
        if self.rng_before_setup is not None:
            restore_rng(self.rng_before_setup, shuffle)

    def restore_after_setup(
        self,
        optimizer: torch.optim.Optimizer,
        scheduler: LambdaLR,
        scaler: torch.amp.GradScaler,
        stopping: EarlyStopping,
        shuffle: torch.Generator,
        ema: WeightAverage | None = None,
    ) -> None:
        if self.training is not None:
            if param_group_layout(optimizer) != self.training.param_groups:
                raise ValueError(f"{self.source}: optimizer groups differ from the plan's")
            optimizer.load_state_dict(self.training.optimizer)
            scheduler.load_state_dict(self.training.scheduler)
            scaler.load_state_dict(self.training.scaler)
            stopping.epochs_without_improvement = self.training.epochs_without_improvement
            if ema is not None and self.training.ema is not None:
                ema.load_state_dict(self.training.ema)
        if self.rng_after_setup is not None:
            restore_rng(self.rng_after_setup, shuffle)

    def epoch_batches(
        self, epoch: int, batches: DataLoader[Any], shuffle: torch.Generator, device: torch.device
    ) -> tuple[Iterator[Any], EpochPosition, dict[str, Any]]:
        """The epoch's batches still to train, its position, and the streams at its start."""
        if self.paused is not None and epoch == self.first_epoch:
            paused = self.paused
            return (
                paused.remaining_batches(batches, shuffle),
                paused.position(device),
                paused.epoch_start_rng,
            )
        # Taken before the iterator draws the epoch's batch order, for a pause to save.
        epoch_start_rng = rng_state(shuffle)
        return iter(batches), EpochPosition.start(device), epoch_start_rng


@dataclass(frozen=True)
class ResumeState:
    """A checkpoint read for resuming: the stage to continue in, and the run's state so far."""

    source: Path
    stage_index: int
    stage_start: StageStart
    model: dict[str, Tensor]
    history: list[EpochResult]
    early_stopping: dict[str, Any]
    ended_stage: bool
    """The checkpoint ended stage `stage_index - 1`, whose best weights the next one starts from."""
    ema: dict[str, Any] | None = None
    """The weight average when the checkpoint was written (plans with `ema`)."""

    @classmethod
    def read(cls, path: Path, plan: Plan) -> "ResumeState":
        """Raises ValueError for a checkpoint another plan wrote."""
        return cls.from_checkpoint(load_checkpoint(path, plan), path)

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any], source: Path) -> "ResumeState":
        if state["stage_done"]:
            stage_index = state["stage_index"] + 1
            stage_start = StageStart(rng_before_setup=state["rng"], source=source)
        else:
            paused = PausedEpoch.from_checkpoint(state) if "partial" in state else None
            stage_index = state["stage_index"]
            stage_start = StageStart(
                first_epoch=state["epoch"] + 1,
                training=StageTrainingState.from_checkpoint(state),
                rng_after_setup=state["rng"] if paused is None else None,
                paused=paused,
                source=source,
            )
        return cls(
            source=source,
            stage_index=stage_index,
            stage_start=stage_start,
            model=state["model"],
            history=[EpochResult(**entry) for entry in state["history"]],
            early_stopping=state["early_stopping"],
            ended_stage=state["stage_done"],
            ema=state.get("ema"),
        )

    @property
    def steps_into_epoch(self) -> int:
        paused = self.stage_start.paused
        return paused.steps if paused is not None else 0

    def restore(self, model: TransferModel, stopping: EarlyStopping) -> list[EpochResult]:
        """Put the weights and early stopping back as the checkpoint had them; the history."""
        model.load_state_dict(self.model)
        stopping.load_state_dict(self.early_stopping)
        if self.ended_stage:
            # As `train.run` ends a stage: the average's weights, then the best seen, if kept.
            if self.ema is not None:
                model.load_state_dict(self.ema["shadow"])
            stopping.restore_best(model)
        logger.info(
            "resuming from %s at stage %d epoch %d after step %d of it",
            self.source,
            self.stage_index,
            self.stage_start.first_epoch,
            self.steps_into_epoch,
        )
        return list(self.history)
