"""The solved head: logistic regression to its optimum, checked against scikit-learn, and the
stages that use it (`solve_head`), including pause and exact resume around them."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

import worker.engine.train as train_module
from worker.engine import (
    EpochResult,
    Sample,
    TrainingHooks,
    TrainingPaused,
    TrainingResult,
    TransferConfig,
    compile_plan,
    run,
)
from worker.engine.linear_probe import LinearSolution, ProbeResult, fit, objective, probe
from worker.engine.spec import HEAD_C_GRID

Data = tuple[list[Sample], list[Sample]]


@pytest.fixture(scope="module")
def digit_features() -> tuple[np.ndarray, np.ndarray]:
    """Real features: sklearn's 8x8 digits as 64 pixel intensities in [0, 1]."""
    data = load_digits()
    return data.data[:900] / 16.0, data.target[:900]


def _sklearn(features: np.ndarray, labels: np.ndarray, c: float) -> LinearSolution:
    model = LogisticRegression(C=c, tol=1e-10, max_iter=20000).fit(features, labels)
    return LinearSolution(torch.from_numpy(model.coef_), torch.from_numpy(model.intercept_))


@pytest.mark.parametrize("c", [0.1, 10.0])
def test_solved_head_matches_sklearn_logistic_regression(
    digit_features: tuple[np.ndarray, np.ndarray], c: float
) -> None:
    features, labels = digit_features
    x, y = torch.from_numpy(features), torch.from_numpy(labels)

    ours = fit(x.float(), y, 10, c=c)
    theirs = _sklearn(features, labels, c)

    # scikit-learn minimises C * sum(CE) + ||W||^2 / 2, which divided by C * n is ours.
    l2 = 1.0 / (c * len(x))
    our_loss = float(objective(ours, x, y, l2=l2))
    their_loss = float(objective(theirs, x, y, l2=l2))
    assert our_loss == pytest.approx(their_loss, abs=1e-3)
    assert our_loss <= their_loss + 1e-6
    plain = [float(objective(s, x, y, l2=0.0)) for s in (ours, theirs)]
    assert plain[0] == pytest.approx(plain[1], abs=1e-3)


def test_probe_keeps_the_strength_with_the_lowest_validation_loss(
    digit_features: tuple[np.ndarray, np.ndarray],
) -> None:
    features, labels = digit_features
    train, val = slice(0, 150), slice(150, 900)
    grid = (0.01, 1.0, 100.0)
    calls = []

    found = probe(
        torch.from_numpy(features[train]).float(),
        torch.from_numpy(labels[train]),
        torch.from_numpy(features[val]).float(),
        torch.from_numpy(labels[val]),
        10,
        grid=grid,
        after_fit=lambda: calls.append(1),
    )

    # Each strength's validation log-loss, by scikit-learn's own fit and metric.
    expected = {
        c: log_loss(
            labels[val],
            LogisticRegression(C=c, tol=1e-10, max_iter=20000)
            .fit(features[train], labels[train])
            .predict_proba(features[val]),
        )
        for c in grid
    }
    assert found.val_losses == pytest.approx(expected, abs=1e-3)
    assert found.c == min(expected, key=expected.__getitem__)
    assert len(calls) == len(grid)


def test_feature_extraction_solves_the_head_in_one_epoch(
    monkeypatch: pytest.MonkeyPatch,
    make_config: Callable[..., TransferConfig],
    colour_data: Data,
    classes: list[str],
) -> None:
    calls: list[tuple[tuple[torch.Tensor, ...], ProbeResult]] = []

    def recording_probe(*args: Any, **kwargs: Any) -> ProbeResult:
        found = probe(*args, **kwargs)
        calls.append((args[:4], found))
        return found

    monkeypatch.setattr(train_module, "probe", recording_probe)
    plan = compile_plan(make_config("feature_extraction", epochs=4, solve_head=True))
    train, val = colour_data
    hooks = _Record()

    result = run(plan, train=train, val=val, classes=classes, hooks=hooks)

    (stage,) = plan.stages
    assert (stage.solve, stage.epochs) == (True, 1)
    (epoch,) = result.history
    assert [done for done, _ in hooks.progress] == list(range(1, len(HEAD_C_GRID) + 1))
    ((train_x, train_y, val_x, _), found) = calls.pop()
    assert len(train_x) == len(train)
    assert len(val_x) == len(val)
    assert epoch.solved_c == found.c
    assert epoch.val_loss == pytest.approx(found.val_losses[found.c], abs=1e-5)
    assert found.val_losses[found.c] == min(found.val_losses.values())
    head = result.model.head[-1]
    torch.testing.assert_close(head.weight.double(), found.solution.weight, atol=1e-6, rtol=0)
    # The optimum on the run's own features, as scikit-learn finds it at the chosen C.
    theirs = _sklearn(train_x.double().numpy(), train_y.numpy(), found.c)
    l2 = 1.0 / (found.c * len(train_x))
    x = train_x.double()
    assert float(objective(found.solution, x, train_y, l2=l2)) == pytest.approx(
        float(objective(theirs, x, train_y, l2=l2)), abs=1e-3
    )


class _Record(TrainingHooks):
    def __init__(self, pause_at: int | None = None) -> None:
        self.pause_at = pause_at
        self.progress: list[tuple[int, int]] = []
        self.epochs: list[EpochResult] = []

    def on_progress(self, done_steps: int, total_steps: int) -> None:
        self.progress.append((done_steps, total_steps))

    def on_epoch_end(self, result: EpochResult) -> None:
        self.epochs.append(result)

    def should_pause(self) -> bool:
        return self.pause_at is not None and self.progress[-1][0] >= self.pause_at


def test_pause_asked_during_a_solve_stops_after_it_and_resumes_exactly(
    tmp_path: Path,
    make_config: Callable[..., TransferConfig],
    colour_data: Data,
    classes: list[str],
) -> None:
    """LP-FT: the solved head, then fine-tuning; a pause asked mid-solve lands at the first
    fine-tuning step, and the resumed run ends with the uninterrupted run's weights."""
    plan = compile_plan(
        make_config("freeze_unfreeze", epochs=2, solve_head=True, base_model="mobilenet_v3_small")
    )
    train, val = colour_data
    checkpoint = tmp_path / "checkpoint.pt"
    uninterrupted = run(plan, train=train, val=val, classes=classes)

    with pytest.raises(TrainingPaused):
        run(
            plan,
            train=train,
            val=val,
            classes=classes,
            hooks=_Record(pause_at=3),
            checkpoint_path=checkpoint,
        )
    state = torch.load(checkpoint, weights_only=True)
    assert (state["stage_index"], state["partial"]["steps"]) == (1, 1)
    assert len(state["history"]) == 1
    resumed = run(
        plan,
        train=train,
        val=val,
        classes=classes,
        checkpoint_path=checkpoint,
        resume_from=checkpoint,
    )

    _assert_same(resumed, uninterrupted)


def _assert_same(resumed: TrainingResult, uninterrupted: TrainingResult) -> None:
    expected = uninterrupted.model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in resumed.model.state_dict().items())
    assert [(r.train_loss, r.val_loss, r.solved_c) for r in resumed.history] == [
        (r.train_loss, r.val_loss, r.solved_c) for r in uninterrupted.history
    ]
