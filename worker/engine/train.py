"""Execute a Plan: stage by stage, epoch by epoch, evaluating on the validation set each epoch.

Stages whose backbone is entirely frozen train the head on backbone features computed once
per image size, so their epochs cost passes over the head only (several per epoch on few
training items: `Stage.passes`). LwF stages also fit the old
heads to outputs the parent model gave on the new images, recorded once before training.
A checkpoint written after every epoch lets `run(..., resume_from=...)` continue a job with
exactly the weights an uninterrupted run would have reached. A run can also be paused after
any training step (`TrainingHooks.should_pause`, e.g. on SIGTERM): it then checkpoints its
position inside the epoch, and a run resumed from that continues at the next step instead of
redoing the epoch, again ending where the uninterrupted run would have.

The pieces live beside this module: the epoch loop and evaluation in `loop`, optimizer,
schedules and early stopping in `optim`, the checkpoint file in `checkpoint`, what a resumed
run restores when in `resume`, each stage's loss in the plan's strategy (`strategies/`),
and the batches (images or cached features) each stage trains on in `stage_data`.
"""

import logging
import random
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .calibration import Calibration, calibrate
from .checkpoint import checkpoint_state, partial_epoch, save_checkpoint
from .distributed import RankHooks, Ranks, current_ranks, launch, shard, sync_buffers
from .ema import WeightAverage
from .features import SharedFeatures
from .imbalance import balanced_class_weights, loss_weights
from .linear_probe import probe
from .loop import (
    EpochResult,
    Precision,
    Progress,
    TrainingHooks,
    TrainingPaused,
    classification_metrics,
    evaluate,
    precision_for,
    train_one_epoch,
)
from .modalities import modality_for
from .modalities.base import EntryCache
from .model import TransferModel, build_model, freeze, make_param_groups, set_batchnorm_mode
from .optim import EarlyStopping, make_optimizer, make_scheduler
from .plan import CLASSIFY, MASKED_LM, Plan, Stage
from .resume import ResumeState, StageStart
from .stage_data import StageBatches, StageData
from .strategies import strategy_of

Samples = Sequence[Any]
"""The samples of the plan's modality (its `Modality.sample_type()`), as `_check_inputs` checks."""

logger = logging.getLogger(__name__)


@dataclass
class TrainingResult:
    model: TransferModel
    history: list[EpochResult]
    metrics: dict[str, Any]
    calibration: Calibration | None = None
    """The newest task's temperature, fitted on validation (None: resumed from a checkpoint
    that did not keep validation logits)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class _Training:
    """What every stage of one `run` shares."""

    plan: Plan
    model: TransferModel
    data: StageData
    device: torch.device
    precision: Precision
    shuffle: torch.Generator
    """The stream every shuffled loader draws its batch order from."""
    hooks: TrainingHooks
    progress: Progress
    stage_steps: list[int]
    """Optimizer steps per epoch of each stage."""
    checkpoint_path: Path | None
    stopping: EarlyStopping
    ema: WeightAverage | None
    """The averaged weights that are validated and kept, when the plan asks for them."""
    ranks: Ranks | None
    """This process's place among the run's processes (`plan.gpus` > 1), else None."""
    history: list[EpochResult] = field(default_factory=list)


@dataclass
class _StageSetup:
    """A stage ready to train: its model settings applied, its optimizer and batches made."""

    index: int
    stage: Stage
    batches: StageBatches
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module


def run(
    plan: Plan,
    *,
    train: Samples,
    val: Samples,
    classes: list[str],
    hooks: TrainingHooks | None = None,
    weights_dir: Path | None = None,
    checkpoint_path: Path | None = None,
    num_workers: int = 0,
    resume_from: Path | None = None,
    unlabelled: Sequence[str] = (),
    parent_dir: Path | None = None,
    host_cache: EntryCache | None = None,
    shared_features: SharedFeatures | None = None,
) -> TrainingResult:
    """Train a model by `plan` and evaluate it on `val` after every epoch.

    `train` and `val` are the plan's modality's samples (image files for an image plan, texts
    for a text plan); `unlabelled` texts join the training texts in ulmfit's masked-LM stage.
    A plan with a parent model (`plan.parent`) starts from its exported files in the folder
    `parent_dir`. A run keeps what its modality derives from the items in `host_cache` (when
    given: the host's cache, within its budget; a text run's token ids) and reuses what an
    earlier run on the same items derived alike. With `shared_features`, stages on a frozen
    backbone read its features from that store when another run stored them (same weights,
    preprocessing, items and view), and store those they compute; the result is the same
    either way (a run on several processes computes its own: the store stays with the
    worker's process).

    Deterministic for a given seed, device and thread count. With early stopping, a stage
    ends once its val loss has not improved on the best so far for `patience` epochs, and
    the best weights are restored before the next stage and at the end. The final metrics
    are those of the returned model: the best epoch's with early stopping, else the last's.
    A checkpoint, when asked for, is rewritten after every epoch; `resume_from` continues
    from one (same plan, data and device) and ends with the weights the uninterrupted run
    would have had.

    After every training step `hooks.should_pause` is polled (after `should_stop`); when it
    returns True the checkpoint is rewritten with the position inside the current epoch
    (steps done, their summed loss, and the random state at the epoch's start and now) and
    TrainingPaused is raised. Resuming from such a checkpoint re-creates the epoch's batch
    order, skips the batches already trained on and trains the rest, so the epoch's history
    entry and the final weights are again those of the uninterrupted run. A resumed run
    reports where it continues from through `hooks.on_resume`.

    With `plan.gpus` > 1 the run trains on that many processes of this host
    (`distributed.py`), takes the steps one process would on the same global batches, and
    only this process calls `hooks` and writes the checkpoint.
    """
    _check_inputs(plan, train, val, classes)
    if plan.gpus > 1 and not torch.distributed.is_initialized():
        return launch(
            run,
            world=plan.gpus,
            device=plan.device,
            hooks=hooks,
            checkpoint_path=checkpoint_path,
            shared={
                "plan": plan,
                "train": train,
                "val": val,
                "classes": classes,
                "weights_dir": weights_dir,
                "num_workers": num_workers,
                "resume_from": resume_from,
                "unlabelled": unlabelled,
                "parent_dir": parent_dir,
                "host_cache": host_cache,
            },
        )
    training = _set_up_run(
        plan,
        train,
        val,
        hooks if hooks is not None else TrainingHooks(),
        weights_dir=weights_dir,
        checkpoint_path=checkpoint_path,
        num_workers=num_workers,
        unlabelled=unlabelled,
        parent_dir=parent_dir,
        host_cache=host_cache,
        shared_features=shared_features,
    )
    # Before any training, so the recording is of the parent as it was (also on resume).
    training.data.record_old_outputs()
    first_stage, start = 0, StageStart()
    if resume_from is not None:
        first_stage, start = _resume(training, ResumeState.read(resume_from, plan))
    for stage_index in range(first_stage, len(plan.stages)):
        _train_stage(training, stage_index, start)
        start = StageStart()
    return _result(training, val, classes)


def _check_inputs(plan: Plan, train: Samples, val: Samples, classes: list[str]) -> None:
    if len(classes) != plan.num_classes:
        raise ValueError(f"{len(classes)} class names for a {plan.num_classes}-class plan")
    if not train or not val:
        raise ValueError(f"training needs at least one training and one validation {plan.modality}")
    kind = modality_for(plan.modality).sample_type()
    if not all(isinstance(sample, kind) for sample in [*train, *val]):
        raise ValueError(f"a {plan.modality} plan trains on {kind.__name__}s")
    labels = {sample.label for sample in [*train, *val]}
    if not labels <= set(range(plan.num_classes)):
        raise ValueError(f"labels outside 0..{plan.num_classes - 1}: {sorted(labels)}")


def _set_up_run(
    plan: Plan,
    train: Samples,
    val: Samples,
    hooks: TrainingHooks,
    *,
    weights_dir: Path | None,
    checkpoint_path: Path | None,
    num_workers: int,
    unlabelled: Sequence[str],
    parent_dir: Path | None,
    host_cache: EntryCache | None,
    shared_features: SharedFeatures | None,
) -> _Training:
    """Seed the random streams, then build the model and the data every stage draws on."""
    seed_everything(plan.seed)
    shuffle = torch.Generator().manual_seed(plan.seed)
    device = torch.device(plan.device)
    ranks = current_ranks(device)
    if ranks is not None:
        device = ranks.device
        hooks = RankHooks(ranks, hooks)
    precision = precision_for(plan, device)
    model = build_model(plan, weights_dir=weights_dir, parent_dir=parent_dir).to(device)
    if precision.channels_last:
        model.to(memory_format=torch.channels_last)
    inputs = modality_for(plan.modality).inputs(
        plan,
        train,
        val,
        unlabelled=unlabelled,
        weights_dir=weights_dir,
        device=device,
        shuffle=shuffle,
        num_workers=num_workers,
        host_cache=host_cache,
    )
    # A stage on cached features makes `passes` passes over the training items per epoch; a
    # solved one counts a step per L2 strength it fits.
    stage_steps = [
        len(stage.c_grid) if stage.c_grid is not None else stage.passes * inputs.steps(train, stage)
        for stage in plan.stages
    ]
    progress = Progress(
        hooks,
        sum(stage.epochs * steps for stage, steps in zip(plan.stages, stage_steps, strict=True)),
    )
    data = StageData(
        plan,
        model,
        train,
        val,
        inputs=inputs,
        device=device,
        precision=precision,
        shuffle=shuffle,
        check_cancelled=progress.check_cancelled,
        shared=shared_features,
    )
    return _Training(
        plan=plan,
        model=model,
        data=data,
        device=device,
        precision=precision,
        shuffle=shuffle,
        hooks=hooks,
        progress=progress,
        stage_steps=stage_steps,
        checkpoint_path=checkpoint_path,
        stopping=EarlyStopping(plan.early_stopping_patience),
        ema=WeightAverage(plan.ema) if plan.ema is not None else None,
        ranks=ranks,
    )


def _resume(training: _Training, resumed: ResumeState) -> tuple[int, StageStart]:
    """Restore the weights, history and progress; where the first stage to train begins."""
    training.history = resumed.restore(training.model, training.stopping)
    completed_epochs = len(training.history)
    steps_into_epoch = resumed.steps_into_epoch
    training.progress.done_steps = (
        sum(training.stage_steps[entry.stage_index] for entry in training.history)
        + steps_into_epoch
    )
    training.hooks.on_resume(completed_epochs, steps_into_epoch)
    return resumed.stage_index, resumed.stage_start


def _train_stage(training: _Training, stage_index: int, start: StageStart) -> None:
    start.restore_before_setup(training.shuffle)
    setup = _set_up_stage(training, stage_index)
    start.restore_after_setup(
        setup.optimizer,
        setup.scheduler,
        setup.scaler,
        training.stopping,
        training.shuffle,
        training.ema,
    )
    for epoch in range(start.first_epoch, setup.stage.epochs + 1):
        if _train_epoch(training, setup, epoch, start):
            logger.info("stage %s: val loss stopped improving; ending the stage", setup.stage.name)
            break
    # The next stage, and the returned model, start from the weights validated last (the
    # average, with EMA), or the best seen so far with early stopping.
    if training.ema is not None:
        training.ema.finish_stage(training.model)
    training.stopping.restore_best(training.model)


def _set_up_stage(training: _Training, stage_index: int) -> _StageSetup:
    plan, model = training.plan, training.model
    stage = plan.stages[stage_index]
    freeze(model, stage.trainable_groups)
    # BatchNorm's running statistics move in train mode whether or not its weights get
    # gradients, so freezing parameters is not enough: the BatchNorm of every group that does
    # not train (of every group, with bn_mode "frozen") is held in eval mode for the stage.
    set_batchnorm_mode(model, stage)
    if training.ema is not None:
        training.ema.start_stage(model)
    optimizer = make_optimizer(plan, make_param_groups(model, stage))
    batches = training.data.for_stage(stage)
    scheduler = make_scheduler(optimizer, stage.schedule, stage.epochs * len(batches.train))
    training.stopping.start_stage()
    loss_fn = _loss_for(plan, stage, training)
    if training.ranks is not None:
        trained, loss_fn = shard(training.ranks, batches.trained, loss_fn)
        batches = replace(batches, trained=trained)
    return _StageSetup(
        index=stage_index,
        stage=stage,
        batches=batches,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=training.precision.grad_scaler(),
        loss_fn=loss_fn,
    )


def _loss_for(plan: Plan, stage: Stage, training: _Training) -> nn.Module:
    weights = loss_weights(plan, [sample.label for sample in training.data.train])
    if weights is not None:
        weights = weights.to(training.device)
    return strategy_of(plan).loss(plan, stage, weights)


def _train_epoch(training: _Training, setup: _StageSetup, epoch: int, start: StageStart) -> bool:
    """Train and evaluate one epoch, record and checkpoint it; True when the stage should stop."""
    training.progress.check_cancelled()
    started = time.perf_counter()
    solved_c = None
    if setup.stage.solve:
        train_loss, solved_c = _solve_head(training, setup)
    else:
        train_loss = _train_steps(training, setup, epoch, start)
    if training.ranks is not None:
        sync_buffers(training.model)
    validated = training.ema.applied(training.model) if training.ema is not None else nullcontext()
    with validated:
        evaluation = evaluate(
            setup.batches.evaluated,
            setup.batches.val,
            training.device,
            training.precision,
            # Calibration needs the classifier's; a masked-LM stage's span the vocabulary.
            keep_logits=setup.stage.objective == CLASSIFY,
        )
        # A masked-LM epoch's loss is over tokens, not the task's classes: early stopping,
        # and the weights and metrics it keeps, follow the classification stages only.
        stop = (
            False
            if setup.stage.objective == MASKED_LM
            else training.stopping.update(training.model, evaluation)
        )
    result = EpochResult(
        stage=setup.stage.name,
        stage_index=setup.index,
        epoch=epoch,
        global_epoch=len(training.history) + 1,
        train_loss=train_loss,
        val_loss=evaluation.loss,
        val_accuracy=evaluation.accuracy,
        learning_rates={group["name"]: group["lr"] for group in setup.optimizer.param_groups},
        seconds=time.perf_counter() - started,
        solved_c=solved_c,
    )
    training.history.append(result)
    logger.info(
        "stage %s epoch %d/%d: train loss %.4f, val loss %.4f, val accuracy %.4f (%.1fs)",
        setup.stage.name,
        epoch,
        setup.stage.epochs,
        train_loss,
        evaluation.loss,
        evaluation.accuracy,
        result.seconds,
    )
    _write_checkpoint(training, setup, epoch=epoch, stage_done=stop or epoch == setup.stage.epochs)
    training.hooks.on_epoch_end(result)
    return stop


def _train_steps(training: _Training, setup: _StageSetup, epoch: int, start: StageStart) -> float:
    """The epoch's training steps (those a paused run left, when resuming); its mean loss.

    A pause rewrites the checkpoint with the position inside the epoch before it propagates.
    """
    batches, position, epoch_start_rng = start.epoch_batches(
        epoch, setup.batches.train, training.shuffle, training.device
    )
    try:
        return train_one_epoch(
            setup.batches.trained,
            batches,
            setup.optimizer,
            setup.scheduler,
            setup.loss_fn,
            training.device,
            lambda: _after_step(training),
            precision=training.precision,
            scaler=setup.scaler,
            position=position,
        )
    except TrainingPaused:
        _write_checkpoint(
            training,
            setup,
            epoch=epoch - 1,
            stage_done=False,
            partial=partial_epoch(position, epoch_start_rng),
        )
        logger.info(
            "paused in stage %s epoch %d after step %d of it",
            setup.stage.name,
            epoch,
            position.steps,
        )
        raise


def _solve_head(training: _Training, setup: _StageSetup) -> tuple[float, float]:
    """A solved stage's epoch: the linear head fitted to its optimum on the cached features
    at every strength of the stage's `c_grid`, the one `probe` chooses (held-out accuracy)
    put in the model. Its training loss, and the strength chosen. Label smoothing is for
    stepped stages: the solved head's regulariser is its L2 strength."""
    plan, model = training.plan, training.model
    train_x, train_y, val_x, val_y = training.data.head_features(setup.stage)
    labels = [sample.label for sample in training.data.train]
    assert setup.stage.c_grid is not None
    # A balanced sampler draws every class equally often: in expectation, balanced weights.
    weights = (
        balanced_class_weights(labels, plan.num_classes)
        if plan.sampler == "balanced"
        else loss_weights(plan, labels)
    )
    found = probe(
        train_x,
        train_y,
        val_x,
        val_y,
        plan.num_classes,
        grid=setup.stage.c_grid,
        train_views=len(train_x) // len(labels),
        class_weights=weights,
        after_fit=lambda: training.progress.step(pausable=False),
    )
    linear = model.head[-1]
    assert isinstance(linear, nn.Linear)
    with torch.no_grad():
        linear.weight.copy_(found.solution.weight)
        linear.bias.copy_(found.solution.bias)
        logits = train_x.double() @ found.solution.weight.T + found.solution.bias
        train_loss = float(
            nn.functional.cross_entropy(
                logits,
                train_y,
                weight=weights.to(logits) if weights is not None else None,
            )
        )
    if training.ema is not None:
        # Nothing was stepped to average: the solved weights are the stage's.
        training.ema.start_stage(model)
    logger.info(
        "stage %s: solved the head (C %g of %s; held-out accuracy and loss, %s: %s)",
        setup.stage.name,
        found.c,
        list(setup.stage.c_grid),
        f"{found.folds}-fold cross-validation" if found.folds else "validation split",
        {c: (round(accuracy, 4), round(loss, 4)) for c, (accuracy, loss) in found.scores.items()},
    )
    return train_loss, found.c


def _after_step(training: _Training) -> None:
    # Before the progress hooks, which may pause the run: the checkpoint a pause writes then
    # holds the average with this step in it.
    if training.ema is not None:
        training.ema.update(training.model)
    training.progress.step()


def _write_checkpoint(
    training: _Training,
    setup: _StageSetup,
    *,
    epoch: int,
    stage_done: bool,
    partial: dict[str, Any] | None = None,
) -> None:
    if training.checkpoint_path is None:
        return
    state = checkpoint_state(
        plan=training.plan,
        model=training.model,
        optimizer=setup.optimizer,
        scheduler=setup.scheduler,
        scaler=setup.scaler,
        history=training.history,
        stopping=training.stopping,
        shuffle=training.shuffle,
        stage_index=setup.index,
        epoch=epoch,
        stage_done=stage_done,
        partial=partial,
        ema=training.ema.state_dict() if training.ema is not None else None,
    )
    save_checkpoint(training.checkpoint_path, state)
    training.hooks.on_checkpoint(training.checkpoint_path)


def _tta_metrics(
    training: _Training, val: Samples, accuracy_without: float
) -> dict[str, Any] | None:
    """The plan's test-time augmentation measured on validation against the single view."""
    if training.plan.tta == "none":
        return None
    modality = modality_for(training.plan.modality)
    summary = modality.evaluate_tta(training.model, val, training.plan, training.device)
    logger.info(
        "test-time augmentation (%s): val accuracy %.4f against %.4f",
        training.plan.tta,
        summary["val_accuracy"],
        accuracy_without,
    )
    return summary | {
        "val_accuracy_without": accuracy_without,
        "gain": summary["val_accuracy"] - accuracy_without,
    }


def _result(training: _Training, val: Samples, classes: list[str]) -> TrainingResult:
    """The model as early stopping kept it, with that evaluation's metrics."""
    kept = training.stopping.kept
    assert kept is not None, "every plan has at least one epoch"
    training.model.eval()
    targets = torch.tensor([sample.label for sample in val])
    metrics = classification_metrics(targets, kept.predictions, classes)
    metrics["val_loss"] = kept.loss
    calibration = calibrate(kept.logits, targets) if kept.logits is not None else None
    metrics["calibration"] = calibration.to_dict() if calibration is not None else None
    metrics["tta"] = _tta_metrics(training, val, metrics["val_accuracy"])
    metrics |= training.data.inputs.describe()
    logger.info(
        "finished: val accuracy %.4f, val loss %.4f", metrics["val_accuracy"], metrics["val_loss"]
    )
    return TrainingResult(
        model=training.model, history=training.history, metrics=metrics, calibration=calibration
    )
