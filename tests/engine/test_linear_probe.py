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
from worker.engine.linear_probe import (
    LinearSolution,
    ProbeResult,
    fit,
    objective,
    probe,
    row_folds,
)
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


def _round_robin_folds(labels: np.ndarray, folds: int) -> np.ndarray:
    """Within each class, items in order take folds 0, 1, ..., folds-1, 0, ..."""
    fold = np.empty(len(labels), dtype=int)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        fold[members] = np.arange(len(members)) % folds
    return fold


def _sklearn_scores(
    fitted: tuple[np.ndarray, np.ndarray], held_out: tuple[np.ndarray, np.ndarray], c: float
) -> tuple[float, float]:
    model = LogisticRegression(C=c, tol=1e-8, max_iter=20000).fit(*fitted)
    probabilities = model.predict_proba(held_out[0])
    accuracy = float(np.mean(probabilities.argmax(1) == held_out[1]))
    return accuracy, float(log_loss(held_out[1], probabilities, labels=range(10)))


def test_probe_keeps_the_strength_with_the_best_cross_validated_accuracy(
    digit_features: tuple[np.ndarray, np.ndarray],
) -> None:
    clean, labels = digit_features
    # Noisy pixels, where a split's log-loss and cross-validated accuracy disagree.
    features = clean + 0.5 * np.random.default_rng(0).standard_normal(clean.shape)
    train, val = slice(0, 100), slice(100, 150)
    grid = (0.001, 0.01, 1.0, 100.0)
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

    # 5 folds over training then validation items, by scikit-learn's own fit and metrics.
    x, y = features[:150], labels[:150]
    fold = _round_robin_folds(y, 5)
    expected = {
        c: tuple(
            np.mean(
                [
                    _sklearn_scores((x[fold != k], y[fold != k]), (x[fold == k], y[fold == k]), c)
                    for k in range(5)
                ],
                axis=0,
            )
        )
        for c in grid
    }
    assert found.folds == 5
    for c in grid:
        accuracy, loss = found.scores[c]
        # Two solvers' optima may put one borderline item on either side: one of 150.
        assert accuracy == pytest.approx(expected[c][0], abs=1 / 150 + 1e-9)
        assert loss == pytest.approx(expected[c][1], abs=1e-3)
    best = max(grid, key=lambda c: (round(expected[c][0], 9), -expected[c][1]))
    assert found.c == best
    # Not the strength one split's log-loss would have chosen.
    assert found.c != min(found.val_losses, key=found.val_losses.__getitem__)
    # The head put in the model is the optimum on the training items alone.
    theirs = _sklearn(features[train], labels[train], best)
    x_train, y_train = torch.from_numpy(features[train]), torch.from_numpy(labels[train])
    l2 = 1.0 / (best * 100)
    assert float(objective(found.solution, x_train, y_train, l2=l2)) == pytest.approx(
        float(objective(theirs, x_train, y_train, l2=l2)), abs=1e-3
    )
    assert len(calls) == len(grid)


def test_a_class_of_one_item_chooses_on_the_validation_split(
    digit_features: tuple[np.ndarray, np.ndarray],
) -> None:
    features, labels = digit_features
    # Class 9 keeps one training item and no validation item: no fold could hold it out.
    keep = np.flatnonzero((labels[:120] != 9) | (np.arange(120) == np.flatnonzero(labels == 9)[0]))
    train, val = keep[:90], keep[90:]
    grid = (0.01, 1.0)

    found = probe(
        torch.from_numpy(features[train]).float(),
        torch.from_numpy(labels[train]),
        torch.from_numpy(features[val]).float(),
        torch.from_numpy(labels[val]),
        10,
        grid=grid,
    )

    expected = {
        c: _sklearn_scores((features[train], labels[train]), (features[val], labels[val]), c)
        for c in grid
    }
    assert found.folds == 0
    for c in grid:
        assert found.scores[c] == pytest.approx(expected[c], abs=1e-3)
    assert found.c == max(grid, key=lambda c: (round(expected[c][0], 9), -expected[c][1]))


def test_an_items_augmented_views_share_its_fold() -> None:
    # Three training items of classes 0, 0, 1 in two views (view after view), and three
    # validation items.
    train_labels = torch.tensor([0, 0, 1, 0, 0, 1])
    val_labels = torch.tensor([1, 0, 1])

    fold = row_folds(train_labels, val_labels, train_views=2, folds=2)

    # Items 0..5 (training, then validation) are of classes 0, 0, 1, 1, 0, 1; each class's
    # items in order go round the folds.
    item_fold = [0, 1, 0, 1, 0, 0]
    assert fold.tolist() == item_fold[:3] + item_fold[:3] + item_fold[3:]


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
    assert found.scores[found.c][0] == max(accuracy for accuracy, _ in found.scores.values())
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
