"""A linear head on frozen features, solved rather than stepped.

With the backbone frozen, a linear head is multinomial logistic regression on fixed features:
a convex problem with one optimum per L2 strength. `probe` finds it by full-batch L-BFGS (in
float64, with a strong-Wolfe line search) for every strength of a small grid, warm-starting
each from the previous, and keeps the one whose head has the lowest validation loss. A head
stepped for a few epochs with AdamW stops wherever its epochs run out; this one is the
optimum, so `feature_extraction` is at least as good as scikit-learn's `LogisticRegression`
on the same features, and a fine-tuning stage after it starts from a converged linear probe
(LP-FT, Kumar et al., ICLR 2022).

The strengths are given as scikit-learn's `C` (the inverse of the L2 weight on a *summed*
loss): the objective here is the mean cross-entropy plus `l2 / 2 * ||W||^2` with
`l2 = 1 / (C * n)`, which has scikit-learn's minimiser, and like scikit-learn's the bias is
not penalised. Deterministic: no random stream is drawn from, and the start is zero.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional

MAX_ITERATIONS = 200
"""L-BFGS iterations per strength (scikit-learn's default is 100; warm-started strengths
converge in far fewer)."""
GRADIENT_TOLERANCE = 1e-6
"""Stop once no gradient entry of the mean loss exceeds this: far below what moves a loss by
1e-3, and reached in tens of iterations where 1e-9 takes hundreds on separable few-shot data."""


@dataclass(frozen=True)
class LinearSolution:
    weight: Tensor
    """(classes, features), float64."""
    bias: Tensor
    """(classes,), float64."""


@dataclass(frozen=True)
class ProbeResult:
    solution: LinearSolution
    c: float
    """The chosen strength (scikit-learn's C)."""
    val_losses: dict[float, float]
    """Validation cross-entropy of the optimum at each strength tried."""


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


def probe(
    train_features: Tensor,
    train_labels: Tensor,
    val_features: Tensor,
    val_labels: Tensor,
    num_classes: int,
    *,
    grid: Sequence[float],
    class_weights: Tensor | None = None,
    label_smoothing: float = 0.0,
    after_fit: Callable[[], None] = lambda: None,
) -> ProbeResult:
    """Solve at every strength of `grid` (strongest regularisation, smallest C, first: each
    warm-starts the next) and keep the optimum with the lowest plain validation cross-entropy
    (the earlier strength on a tie). `after_fit` is called after each strength."""
    val_x = val_features.double()
    best: tuple[float, float, LinearSolution] | None = None
    losses: dict[float, float] = {}
    start: LinearSolution | None = None
    for c in sorted(grid):
        start = fit(
            train_features,
            train_labels,
            num_classes,
            c=c,
            class_weights=class_weights,
            label_smoothing=label_smoothing,
            start=start,
        )
        with torch.no_grad():
            loss = float(functional.cross_entropy(val_x @ start.weight.T + start.bias, val_labels))
        losses[c] = loss
        if best is None or loss < best[0]:
            best = (loss, c, start)
        after_fit()
    assert best is not None, "the grid lists at least one strength"
    return ProbeResult(solution=best[2], c=best[1], val_losses=losses)
