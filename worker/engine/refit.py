"""Use every label once the recipe is chosen (`refit: true`; AutoGluon's `refit_full`).

A run holds its validation split out to choose what it cannot know beforehand: with early
stopping, how many epochs to train; with a solved head, its L2 strength; and the temperature
that calibrates its probabilities. `refit` takes those choices as they fell and trains once
more, on the training and validation items together, with exactly that recipe: the stages up
to the kept epoch (the last one without early stopping), each solved head at its chosen
strength, and no early stopping (there is nothing held out left to stop on). The refit model
is what gets published; its validation numbers (and the calibration) stay those of the run
that chose the recipe, since the refit model has seen the validation items.
"""

from dataclasses import replace
from typing import Any

from .loop import EpochResult, TrainingHooks
from .plan import Plan
from .train import Samples, TrainingResult, run

REFIT_METRICS = "refit"
"""The metrics key that records a refit: what it trained on and with which recipe."""


def refit_plan(plan: Plan, history: list[EpochResult]) -> Plan:
    """`plan` as its run chose it on validation: up to the kept epoch, heads at their chosen
    strengths, without early stopping."""
    if not history:
        raise ValueError("refit needs the history of the run that chose the recipe")
    if plan.early_stopping_patience is None:
        kept = history[-1]
    else:
        # Early stopping keeps the epoch with the lowest val loss over the whole run.
        kept = min(history, key=lambda entry: entry.val_loss)
    stages = []
    for index, stage in enumerate(plan.stages[: kept.stage_index + 1]):
        epochs = kept.epoch if index == kept.stage_index else stage.epochs
        if stage.solve:
            (c,) = [entry.solved_c for entry in history if entry.stage_index == index]
            assert c is not None, "a solved stage's epoch records its strength"
            stage = replace(stage, c_grid=(c,))
        stages.append(replace(stage, epochs=epochs))
    return replace(plan, stages=tuple(stages), early_stopping_patience=None, refit=False)


class _RefitHooks(TrainingHooks):
    """The job's hooks during the refit: progress and cancelling pass through; the refit's
    epochs are not the run's history, and it runs to its end (nothing checkpoints it)."""

    def __init__(self, hooks: TrainingHooks) -> None:
        self.hooks = hooks

    def should_stop(self) -> bool:
        return self.hooks.should_stop()

    def on_progress(self, done_steps: int, total_steps: int) -> None:
        self.hooks.on_progress(done_steps, total_steps)


def refit(
    plan: Plan,
    chosen: TrainingResult,
    *,
    train: Samples,
    val: Samples,
    classes: list[str],
    hooks: TrainingHooks | None = None,
    **run_options: Any,
) -> TrainingResult:
    """Train `refit_plan(plan, chosen.history)` on `train` + `val`; the refit model, with
    `chosen`'s history, validation metrics and calibration, and a record of the refit under
    `metrics["refit"]`. `run_options` go to `run` (weights_dir, parent_dir, ...)."""
    recipe = refit_plan(plan, chosen.history)
    everything: Any = [*train, *val]
    refitted = run(
        recipe,
        train=everything,
        val=val,
        classes=classes,
        hooks=_RefitHooks(hooks) if hooks is not None else None,
        **run_options,
    )
    record = {
        "train_items": len(everything),
        "epochs": [stage.epochs for stage in recipe.stages],
        "stages": [stage.name for stage in recipe.stages],
        "solved_c": {
            stage.name: stage.c_grid[0] for stage in recipe.stages if stage.solve and stage.c_grid
        },
    }
    return TrainingResult(
        model=refitted.model,
        history=chosen.history,
        metrics={**chosen.metrics, REFIT_METRICS: record},
        calibration=chosen.calibration,
    )
