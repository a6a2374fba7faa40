"""The numbers a test split gives: a bootstrap interval of a mean, and macro F1 (numpy only).

Used by the worker (a trial's test metrics) and by the diagnosis (a transfer strategy against
`scratch` on the same test items, so their difference is bootstrapped item by item, paired).
"""

from collections.abc import Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
_CHUNK_CELLS = 2_000_000
"""Resamples are drawn in chunks of at most this many indices, so a big test split stays small
in memory."""


def bootstrap_interval(
    values: Sequence[float], *, seed: int = 0, resamples: int = RESAMPLES, level: float = LEVEL
) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of `values` (e.g. 1/0 per test item for
    accuracy, or a per-item difference of two models for their paired difference)."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError("a bootstrap interval needs at least one value")
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _CHUNK_CELLS // array.size)
    means: list[np.ndarray] = []
    remaining = resamples
    while remaining > 0:
        count = min(per_chunk, remaining)
        indices = rng.integers(0, array.size, size=(count, array.size))
        means.append(array[indices].mean(axis=1))
        remaining -= count
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(np.concatenate(means), [tail, 1.0 - tail])
    return float(low), float(high)


def macro_f1(targets: Sequence[int], predictions: Sequence[int], num_classes: int) -> float:
    """The unweighted mean of per-class F1 over the classes present in `targets`."""
    truth = np.asarray(targets, dtype=np.int64)
    guess = np.asarray(predictions, dtype=np.int64)
    scores = []
    for label in range(num_classes):
        support = int((truth == label).sum())
        if support == 0:
            continue
        hits = int(((truth == label) & (guess == label)).sum())
        predicted = int((guess == label).sum())
        precision = hits / predicted if predicted else 0.0
        recall = hits / support
        scores.append(2 * precision * recall / (precision + recall) if hits else 0.0)
    return float(np.mean(scores)) if scores else 0.0
