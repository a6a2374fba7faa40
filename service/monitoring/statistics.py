"""The statistics of monitoring, on numpy and scipy: the reduced feature space, the shift test
of a window against its version's reference, and accuracy estimated without labels.

Shift is tested with the maximum mean discrepancy (MMD, Gretton et al. 2012) under a Gaussian
kernel, its p-value from a permutation test. Chosen over per-component KS with a Bonferroni
bound because MMD is one test of the whole joint distribution (a shift that moves components
together, or changes their correlation, is seen; per-component KS sees only marginals) and the
permutation p-value is exact at any sample size, where Bonferroni over 32 components is
conservative and loses power. The kernel width is the median pairwise distance of the
reference (the median heuristic), fixed per version so it never depends on the window.

The reduced space is a PCA projection fitted on features of the version's *training* items,
never on the reference sample itself: a projection fitted on the reference spreads the
reference along its top components more than new samples of the same distribution (the
sample eigenvalues are biased upward), and in-distribution windows would then alarm.
"""

from dataclasses import dataclass

import numpy as np

# `scipy.stats` is imported where a test runs, not here: it takes half a second to import,
# which every API and worker process would pay at start for two window tests.

SIGNIFICANCE = 0.01
"""A window is `shifted` when its MMD permutation p-value is below this."""

PERMUTATIONS = 500
"""Permutations per window: the smallest p-value is 1/(PERMUTATIONS + 1), well below 0.01."""


@dataclass(frozen=True)
class Projection:
    """Centre and project features to the top principal components: `(x - mean) @ components.T`."""

    mean: np.ndarray
    """(feature_dim,)"""
    components: np.ndarray
    """(dims, feature_dim), orthonormal rows."""

    def __call__(self, features: np.ndarray) -> np.ndarray:
        projected: np.ndarray = (np.asarray(features, dtype=np.float64) - self.mean) @ (
            self.components.T
        )
        return projected.astype(np.float32)


def fit_projection(features: np.ndarray, dims: int) -> Projection:
    """PCA by the SVD of the centred features, keeping at most `dims` components (and never more
    than the samples allow)."""
    x = np.asarray(features, dtype=np.float64)
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    keep = max(1, min(dims, x.shape[0] - 1, x.shape[1]))
    return Projection(mean=mean, components=vt[:keep])


def squared_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    distances: np.ndarray = (
        (x * x).sum(axis=1)[:, None] + (y * y).sum(axis=1)[None, :] - 2.0 * x @ y.T
    )
    return np.maximum(distances, 0.0)


def median_bandwidth(reference: np.ndarray) -> float:
    """The median heuristic: the median distance between distinct reference rows."""
    distances = squared_distances(reference, reference)
    upper = distances[np.triu_indices(len(reference), k=1)]
    median = float(np.sqrt(np.median(upper))) if upper.size else 1.0
    return median if median > 0 else 1.0


def _kernel(x: np.ndarray, y: np.ndarray, bandwidth: float) -> np.ndarray:
    kernel: np.ndarray = np.exp(-squared_distances(x, y) / (2.0 * bandwidth**2))
    return kernel


def mmd2(x: np.ndarray, y: np.ndarray, bandwidth: float) -> float:
    """The (biased, V-statistic) squared MMD between samples `x` and `y`."""
    return float(
        _kernel(x, x, bandwidth).mean()
        + _kernel(y, y, bandwidth).mean()
        - 2.0 * _kernel(x, y, bandwidth).mean()
    )


@dataclass(frozen=True)
class TestResult:
    score: float
    p_value: float


def mmd_test(
    reference: np.ndarray,
    window: np.ndarray,
    *,
    bandwidth: float,
    permutations: int = PERMUTATIONS,
    seed: int = 0,
) -> TestResult:
    """Squared MMD of `window` against `reference` and its permutation p-value:
    (1 + #{permuted MMD >= observed}) / (1 + permutations).

    The kernel matrix of the pooled sample is computed once; each labelling `a` (1/n on one
    side, -1/m on the other) gives MMD^2 = a' K a, so all permutations are one matrix product.
    """
    pooled = np.concatenate([reference, window]).astype(np.float64)
    n, total = len(reference), len(pooled)
    kernel = _kernel(pooled, pooled, bandwidth)
    rng = np.random.default_rng(seed)
    first = np.zeros((total, permutations + 1), dtype=bool)
    first[:n, 0] = True  # column 0: the observed split
    for column in range(1, permutations + 1):
        first[rng.permutation(total)[:n], column] = True
    weights = np.where(first, 1.0 / n, -1.0 / (total - n))
    statistics = np.einsum("ip,ip->p", kernel @ weights, weights)
    observed = float(statistics[0])
    exceeded = int(np.count_nonzero(statistics[1:] >= observed - 1e-12))
    return TestResult(score=observed, p_value=(1 + exceeded) / (1 + permutations))


def class_shift(reference_counts: np.ndarray, window_counts: np.ndarray) -> TestResult:
    """How far the window's predicted-class frequencies moved from the reference's: the total
    variation distance, and the p-value of a chi-square goodness-of-fit test against the
    reference frequencies (add-one smoothed, so a class never predicted on the reference does
    not make the test infinite)."""
    reference = np.asarray(reference_counts, dtype=np.float64) + 1.0
    expected_share = reference / reference.sum()
    observed = np.asarray(window_counts, dtype=np.float64)
    total = observed.sum()
    if total == 0:
        return TestResult(score=0.0, p_value=1.0)
    distance = 0.5 * float(np.abs(observed / total - expected_share).sum())
    if len(observed) < 2:
        return TestResult(score=distance, p_value=1.0)
    from scipy import stats

    result = stats.chisquare(observed, expected_share * total)
    return TestResult(score=distance, p_value=float(result.pvalue))


def confidence_shift(reference: np.ndarray, window: np.ndarray) -> TestResult:
    """The two-sample Kolmogorov-Smirnov test of the window's confidences against the
    reference's (statistic and p-value)."""
    from scipy import stats

    result = stats.ks_2samp(reference, window)
    return TestResult(score=float(result.statistic), p_value=float(result.pvalue))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    result: np.ndarray = shifted / shifted.sum(axis=1, keepdims=True)
    return result


def calibrated_probabilities(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities as predict answers them: the logits divided by the version's fitted
    temperature (`worker/engine/calibration.py`), then softmax."""
    return softmax(np.asarray(logits, dtype=np.float64) / temperature)


def expected_accuracy(confidences: np.ndarray) -> float | None:
    """Confidence-based performance estimation (as NannyML's CBPE for classifiers): with
    calibrated probabilities, the chance the predicted class is right is its probability, so the
    expected accuracy of a window is the mean of its top probabilities."""
    values = np.asarray(confidences, dtype=np.float64)
    return float(values.mean()) if values.size else None
