"""The learning-rate range test (Smith 2015, "Cyclical Learning Rates"; fastai's `lr_find`).

The first classification stage of a plan trains for a short run while every group's rate grows
exponentially, from `start_lr` to `end_lr` at the stage's top group, keeping the stage's
discriminative ratios. The loss after each step is smoothed (an exponential moving average with
bias correction, as fastai does) and the test ends early once the smoothed loss exceeds
`DIVERGENCE_FACTOR` times the best seen. The suggestion is fastai's "valley": in the curve
without its first tenth and last few points, the longest stretch of falling loss, and the point
two thirds of the way down it.

Nothing of the training loop is copied: the run is set up as `train.run` sets one up (model,
inputs, feature cache, loss), and the steps are `loop.train_one_epoch`'s, with a rate schedule
that grows instead of decays. The model it trains is thrown away.
"""

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from .loop import Targets, TrainingHooks, train_one_epoch
from .modalities.base import EntryCache
from .model import freeze, make_param_groups, set_batchnorm_mode
from .optim import make_optimizer
from .plan import CLASSIFY, Plan, spec_lr_for
from .train import Samples, _loss_for, _set_up_run

START_LR = 1e-7
END_LR = 10.0
MAX_STEPS = 100
MIN_STEPS = 20
EPOCHS_OF_STEPS = 10
"""Small data: at most this many passes over the training set (but at least MIN_STEPS steps)."""
SMOOTHING = 0.98
DIVERGENCE_FACTOR = 4.0


@dataclass(frozen=True)
class LrFinding:
    """The curve (the top group's rate at each step, the smoothed loss after it) and the
    suggested rate for the stage's top group."""

    stage: str
    lrs: list[float]
    losses: list[float]
    suggestion: float
    suggestion_index: int
    """Where the suggestion lies on the curve."""
    lr: float | None
    """The spec's `lr` (the head's rate on a frozen backbone) that gives the stage's top group
    the suggested rate, when the plan follows `lr: auto` (see `with_found_lr`)."""
    diverged: bool
    """True when the loss blew up before `end_lr` (the curve stops there)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "lrs": self.lrs,
            "losses": self.losses,
            "suggestion": self.suggestion,
            "suggestion_index": self.suggestion_index,
            "lr": self.lr,
            "diverged": self.diverged,
        }


class _Diverged(Exception):  # noqa: N818 - control flow within this module
    """The smoothed loss left the range worth plotting."""


class _RecordingLoss(nn.Module):
    """The stage's loss, keeping the last value for the step's record."""

    def __init__(self, loss_fn: nn.Module) -> None:
        super().__init__()
        self.loss_fn = loss_fn
        self.last: Tensor | None = None

    def forward(self, outputs: Tensor, targets: Targets) -> Tensor:
        loss: Tensor = self.loss_fn(outputs, targets)
        self.last = loss.detach()
        return loss


class _Curve:
    """The smoothed loss per step, and when to stop."""

    def __init__(self, lrs: Sequence[float]) -> None:
        self.schedule = lrs
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.average = 0.0
        self.best = math.inf
        self.diverged = False

    def record(self, loss: float) -> None:
        step = len(self.losses)
        self.average = SMOOTHING * self.average + (1 - SMOOTHING) * loss
        smoothed = self.average / (1 - SMOOTHING ** (step + 1))
        if not math.isfinite(smoothed):
            # Kept out of the curve: JSON (and Postgres) have no infinity.
            self.diverged = True
            raise _Diverged()
        self.lrs.append(self.schedule[step])
        self.losses.append(smoothed)
        self.best = min(self.best, smoothed)
        if smoothed > DIVERGENCE_FACTOR * self.best:
            self.diverged = True
            raise _Diverged()


def range_steps(train_steps_per_epoch: int) -> int:
    """How many steps the test takes: about 100, fewer for small data."""
    return max(MIN_STEPS, min(MAX_STEPS, EPOCHS_OF_STEPS * train_steps_per_epoch))


def exponential_lrs(start: float, end: float, steps: int) -> list[float]:
    return [start * (end / start) ** (step / max(steps - 1, 1)) for step in range(steps)]


def valley(lrs: Sequence[float], losses: Sequence[float]) -> int:
    """fastai's `valley`: the index two thirds down the longest run of falling loss, looked
    for without the curve's first tenth and last five points (the start is noise, the end
    the blow-up)."""
    skip_start = len(losses) // 10
    skip_end = 5 if len(losses) - skip_start > 10 else 0
    window = list(losses[skip_start : len(losses) - skip_end])
    count = len(window)
    if count < 2:
        return skip_start
    # Longest decreasing subsequence ending at each point.
    longest = [1] * count
    best_end = 0
    for i in range(1, count):
        for j in range(i):
            if window[i] < window[j] and longest[i] < longest[j] + 1:
                longest[i] = longest[j] + 1
        if longest[i] > longest[best_end]:
            best_end = i
    best_start = best_end - longest[best_end]
    sections = (best_end - best_start) / 3
    return skip_start + max(0, best_start + int(sections) + int(sections / 2))


def lr_find(
    plan: Plan,
    *,
    train: Samples,
    val: Samples,
    hooks: TrainingHooks | None = None,
    weights_dir: Path | None = None,
    num_workers: int = 0,
    parent_dir: Path | None = None,
    host_cache: EntryCache | None = None,
    steps: int | None = None,
    start_lr: float = START_LR,
    end_lr: float = END_LR,
) -> LrFinding:
    """Run the range test on the plan's first classification stage; see the module's doc.

    Deterministic for a given seed, like `run`; `hooks` see the steps and may cancel the test
    (`TrainingCancelled`) or pause it (`TrainingPaused`; a paused test starts over).
    """
    stage_index = next(i for i, stage in enumerate(plan.stages) if stage.objective == CLASSIFY)
    stage = plan.stages[stage_index]
    training = _set_up_run(
        plan,
        train,
        val,
        hooks if hooks is not None else TrainingHooks(),
        weights_dir=weights_dir,
        checkpoint_path=None,
        num_workers=num_workers,
        unlabelled=(),
        parent_dir=parent_dir,
        host_cache=host_cache,
        shared_features=None,
    )
    model = training.model
    freeze(model, stage.trainable_groups)
    set_batchnorm_mode(model, stage)
    optimizer = make_optimizer(plan, make_param_groups(model, stage))
    batches = training.data.for_stage(stage)
    # Sized by passes over the data: a cached stage's epoch may make several (`Stage.passes`).
    count = steps if steps is not None else range_steps(len(batches.train) // stage.passes)
    training.progress.total_steps = count
    top_lr = max(stage.group_lrs.values())
    curve = _Curve(exponential_lrs(start_lr, end_lr, count))
    # Every group's rate is its planned one times a factor that takes the top group along
    # the curve; LambdaLR multiplies each group's initial rate by it.
    scheduler = LambdaLR(optimizer, lambda step: curve.schedule[min(step, count - 1)] / top_lr)
    loss = _RecordingLoss(_loss_for(plan, stage, training))

    def after_step() -> None:
        assert loss.last is not None
        curve.record(float(loss.last))
        training.progress.step()

    with contextlib.suppress(_Diverged):
        train_one_epoch(
            batches.trained,
            _repeated(batches.train, count),
            optimizer,
            scheduler,
            loss,
            training.device,
            after_step,
            precision=training.precision,
            scaler=training.precision.grad_scaler(),
        )
    if not curve.losses:
        raise ValueError("the loss was not finite after the first step: nothing to suggest from")
    index = valley(curve.lrs, curve.losses)
    suggestion = curve.lrs[index]
    return LrFinding(
        stage=stage.name,
        lrs=curve.lrs,
        losses=curve.losses,
        suggestion=suggestion,
        suggestion_index=index,
        lr=spec_lr_for(plan, stage_index, suggestion),
        diverged=curve.diverged,
    )


def _repeated(loader: Any, steps: int) -> Iterator[tuple[Tensor, Targets]]:
    """`steps` batches: the loader's epochs one after another (each shuffled anew)."""
    done = 0
    while True:
        for batch in loader:
            if done == steps:
                return
            done += 1
            yield batch
