"""`refit: true`: once more on train + validation, with the recipe the run chose."""

from collections.abc import Callable
from typing import Any

import pytest

import worker.engine.refit as refit_module
from worker.engine import EpochResult, Sample, TransferConfig, compile_plan, run
from worker.engine.refit import refit, refit_plan
from worker.engine.train import TrainingResult

Data = tuple[list[Sample], list[Sample]]


def test_refit_trains_once_more_on_train_and_validation(
    monkeypatch: pytest.MonkeyPatch,
    make_config: Callable[..., TransferConfig],
    colour_data: Data,
    classes: list[str],
) -> None:
    plan = compile_plan(
        make_config("freeze_unfreeze", epochs=3, solve_head=True, refit=True, lr=0.01)
    )
    train, val = colour_data
    chosen = run(plan, train=train, val=val, classes=classes)
    runs: list[tuple[Any, list[Sample]]] = []

    def counted_run(recipe: Any, *, train: list[Sample], **options: Any) -> TrainingResult:
        runs.append((recipe, list(train)))
        return run(recipe, train=train, **options)

    monkeypatch.setattr(refit_module, "run", counted_run)

    result = refit(plan, chosen, train=train, val=val, classes=classes)

    ((recipe, trained_on),) = runs
    assert trained_on == [*train, *val]
    assert [(s.name, s.epochs) for s in recipe.stages] == [("head", 1), ("unfreeze", 2)]
    assert recipe.stages[0].c_grid == (chosen.history[0].solved_c,)
    assert (recipe.refit, recipe.early_stopping_patience) == (False, None)
    assert result.model is not chosen.model
    assert result.history == chosen.history
    assert result.calibration == chosen.calibration
    assert result.metrics["val_accuracy"] == chosen.metrics["val_accuracy"]
    assert result.metrics["refit"]["train_items"] == len(train) + len(val)


def _epoch(stage_index: int, epoch: int, val_loss: float, solved_c: float | None = None) -> Any:
    return EpochResult(
        stage="s",
        stage_index=stage_index,
        epoch=epoch,
        global_epoch=0,
        train_loss=0.0,
        val_loss=val_loss,
        val_accuracy=0.0,
        learning_rates={},
        seconds=0.0,
        solved_c=solved_c,
    )


def test_refit_stops_where_early_stopping_kept_the_weights(
    make_config: Callable[..., TransferConfig],
) -> None:
    plan = compile_plan(
        make_config("gradual_unfreeze", epochs=6, solve_head=True, early_stopping_patience=2)
    )
    history = [
        _epoch(0, 1, 0.9, solved_c=3.0),
        _epoch(1, 1, 0.7),
        _epoch(2, 1, 0.5),
        _epoch(3, 1, 0.6),
        _epoch(3, 2, 0.8),
    ]

    recipe = refit_plan(plan, history)

    assert [stage.epochs for stage in recipe.stages] == [1, 1, 1]
    assert recipe.stages[0].c_grid == (3.0,)
    assert [stage.name for stage in recipe.stages] == [s.name for s in plan.stages[:3]]
