"""A linear head on frozen features, solved rather than stepped.

With the backbone frozen, a linear head is multinomial logistic regression on fixed features:
a convex problem with one optimum per L2 strength. `probe` finds it by full-batch L-BFGS (in
float64, with a strong-Wolfe line search) for every strength of a small grid, warm-starting
each from the previous. A head stepped for a few epochs with AdamW stops wherever its epochs
run out; this one is the optimum, so `feature_extraction` is at least as good as
scikit-learn's `LogisticRegression` on the same features, and a fine-tuning stage after it
starts from a converged linear probe (LP-FT, Kumar et al., ICLR 2022).

The strength is chosen for accuracy by k-fold cross-validation over every labelled item
(training and validation together), not by one validation split's log-loss. On the few
dozen items per class this service is made for, one split's choice is noise, and the
log-loss prefers weak regularisation (confident probabilities) where accuracy is better with
strong: on `bench/text_quality.py`'s fortunes, 10 draws of 70 per class, the test accuracy
was 0.819 at scikit-learn's usual C = 10, 0.822 choosing on one split's loss and 0.840
choosing on 5-fold accuracy. The calibration temperature, fitted afterwards on validation,
repairs the confidence that strong regularisation takes away.

The strengths are given as scikit-learn's `C` (the inverse of the L2 weight on a *summed*
loss): the objective here is the mean cross-entropy plus `l2 / 2 * ||W||^2` with
`l2 = 1 / (C * n)`, which has scikit-learn's minimiser, and like scikit-learn's the bias is
not penalised. Deterministic: no random stream is drawn from, and the start is zero.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional

from .spec import HEAD_CV_MAX_ITEMS

MAX_ITERATIONS = 200
"""L-BFGS iterations per strength (scikit-learn's default is 100; warm-started strengths
converge in far fewer)."""
GRADIENT_TOLERANCE = 1e-6
"""Stop once no gradient entry of the mean loss exceeds this: far below what moves a loss by
1e-3, and reached in tens of iterations where 1e-9 takes hundreds on separable few-shot data."""
CV_FOLDS = 5


@dataclass(frozen=True)
class LinearSolution:
    weight: Tensor
    """(classes, features), float64."""
    bias: Tensor
    """(classes,), float64."""


@dataclass(frozen=True)
class ProbeResult:
    solution: LinearSolution
    """The optimum on the training items at the chosen strength."""
    c: float
    """The chosen strength (scikit-learn's C)."""
    val_losses: dict[float, float]
    """Validation cross-entropy of the training items' optimum at each strength tried."""
    scores: dict[float, tuple[float, float]]
    """What chose: each strength's (accuracy, cross-entropy) on held-out items, the mean over
    `folds` cross-validation folds, or on the validation split where `folds` is 0."""
    folds: int


def objective(
    solution: LinearSolution,
    features: Tensor,
    labels: Tensor,
    *,
    l2: float,
    class_weights: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Mean (class-weighted, smoothed) cross-entropy plus `l2 / 2 * ||W||^2`."""
    logits = features @ solution.weight.T + solution.bias
    loss = functional.cross_entropy(
        logits, labels, weight=class_weights, label_smoothing=label_smoothing
    )
    return loss + 0.5 * l2 * solution.weight.square().sum()


def fit(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    c: float,
    class_weights: Tensor | None = None,
    label_smoothing: float = 0.0,
    start: LinearSolution | None = None,
) -> LinearSolution:
    """The minimiser of `objective` at strength `c`, from `start` (default: zeros)."""
    x = features.double()
    weight = (
        start.weight.clone()
        if start is not None
        else torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device)
    ).requires_grad_(True)
    bias = (
        start.bias.clone()
        if start is not None
        else torch.zeros(num_classes, dtype=x.dtype, device=x.device)
    ).requires_grad_(True)
    weights = class_weights.to(x) if class_weights is not None else None
    l2 = 1.0 / (c * len(x))
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=MAX_ITERATIONS,
        tolerance_grad=GRADIENT_TOLERANCE,
        tolerance_change=1e-10,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = objective(
            LinearSolution(weight, bias),
            x,
            labels,
            l2=l2,
            class_weights=weights,
            label_smoothing=label_smoothing,
        )
        loss.backward()
        return loss

    optimizer.step(closure)
    return LinearSolution(weight.detach(), bias.detach())


def stratified_folds(labels: Tensor, folds: int) -> Tensor:
    """Each item's fold in 0..folds-1: within a class, items go round the folds in order, so
    every fold holds each class's share. Deterministic, and no random stream is drawn from."""
    fold = torch.empty_like(labels)
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        fold[members] = torch.arange(len(members)) % folds
    return fold


def row_folds(train_labels: Tensor, val_labels: Tensor, *, train_views: int, folds: int) -> Tensor:
    """The fold of each row of the training rows then the validation rows: folds stratified
    over items (training then validation), each of an item's `train_views` views (the
    training rows view after view) in its item's fold, so no item is both fitted and held
    out."""
    items = len(train_labels) // train_views
    item_fold = stratified_folds(torch.cat([train_labels[:items], val_labels]), folds)
    return torch.cat([item_fold[:items].repeat(train_views), item_fold[items:]])


def _held_out_score(
    solution: LinearSolution, features: Tensor, labels: Tensor
) -> tuple[float, float]:
    with torch.no_grad():
        logits = features.double() @ solution.weight.T + solution.bias
        accuracy = float((logits.argmax(1) == labels).double().mean())
        return accuracy, float(functional.cross_entropy(logits, labels))


def _path(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    grid: Sequence[float],
    after_fit: Callable[[], None] = lambda: None,
    **options: Any,
) -> dict[float, LinearSolution]:
    """The optimum at each strength, strongest regularisation (smallest C) first, each
    warm-starting the next."""
    solutions: dict[float, LinearSolution] = {}
    start: LinearSolution | None = None
    for c in sorted(grid):
        start = solutions[c] = fit(features, labels, num_classes, c=c, start=start, **options)
        after_fit()
    return solutions


def cross_validated_scores(
    features: Tensor,
    labels: Tensor,
    fold: Tensor,
    num_classes: int,
    *,
    grid: Sequence[float],
    **options: Any,
) -> dict[float, tuple[float, float]]:
    """Each strength's mean held-out (accuracy, cross-entropy) over the folds `fold` numbers
    each row into."""
    folds = int(fold.max()) + 1
    totals = dict.fromkeys(grid, (0.0, 0.0))
    for k in range(folds):
        inside, outside = fold != k, fold == k
        for c, solution in _path(
            features[inside], labels[inside], num_classes, grid, **options
        ).items():
            accuracy, loss = _held_out_score(solution, features[outside], labels[outside])
            totals[c] = (totals[c][0] + accuracy / folds, totals[c][1] + loss / folds)
    return totals


def probe(
    train_features: Tensor,
    train_labels: Tensor,
    val_features: Tensor,
    val_labels: Tensor,
    num_classes: int,
    *,
    grid: Sequence[float],
    train_views: int = 1,
    class_weights: Tensor | None = None,
    label_smoothing: float = 0.0,
    after_fit: Callable[[], None] = lambda: None,
) -> ProbeResult:
    """Solve on the training items at every strength of `grid` and keep the strength with the
    best held-out accuracy, ties to the lower held-out cross-entropy, then to the stronger
    regularisation. Held out: `CV_FOLDS`-fold cross-validation over training and validation
    items together (fewer folds where a class has fewer items, none at all where one has a
    single item or there are over `HEAD_CV_MAX_ITEMS`), else the validation split. The training
    rows may be `train_views` augmented views of each item, view after view: an item's views
    share its fold. A one-strength grid (a refit's) is solved without choosing. `after_fit` is
    called after each strength."""
    options: dict[str, Any] = {"class_weights": class_weights, "label_smoothing": label_smoothing}
    path = _path(train_features, train_labels, num_classes, grid, after_fit, **options)
    val_scores = {c: _held_out_score(s, val_features, val_labels) for c, s in path.items()}
    items = len(train_labels) // train_views
    labelled = torch.cat([train_labels[:items], val_labels])
    smallest_class = int(torch.bincount(labelled).min()) if len(labelled) else 0
    folds = min(CV_FOLDS, smallest_class) if len(labelled) <= HEAD_CV_MAX_ITEMS else 0
    if len(grid) > 1 and folds >= 2:
        scores = cross_validated_scores(
            torch.cat([train_features, val_features]),
            torch.cat([train_labels, val_labels]),
            row_folds(train_labels, val_labels, train_views=train_views, folds=folds),
            num_classes,
            grid=grid,
            **options,
        )
    else:
        scores, folds = val_scores, 0
    # Accuracies are means of fold means: equal counts of hits can differ in the last bits.
    c = max(sorted(grid), key=lambda c: (round(scores[c][0], 9), -scores[c][1]))
    return ProbeResult(
        solution=path[c],
        c=c,
        val_losses={c: loss for c, (_, loss) in val_scores.items()},
        scores=scores,
        folds=folds,
    )
