"""The monitoring statistics against independent computations, and their error rates on
same-distribution and shifted samples."""

import itertools

import numpy as np
import pytest
from sklearn.decomposition import PCA

from service.monitoring.statistics import (
    SIGNIFICANCE,
    calibrated_probabilities,
    class_shift,
    confidence_shift,
    expected_accuracy,
    fit_projection,
    median_bandwidth,
    mmd2,
    mmd_test,
)


def brute_force_mmd2(x: np.ndarray, y: np.ndarray, bandwidth: float) -> float:
    def k(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.exp(-np.sum((a - b) ** 2) / (2 * bandwidth**2)))

    xx = sum(k(a, b) for a, b in itertools.product(x, x)) / len(x) ** 2
    yy = sum(k(a, b) for a, b in itertools.product(y, y)) / len(y) ** 2
    xy = sum(k(a, b) for a, b in itertools.product(x, y)) / (len(x) * len(y))
    return xx + yy - 2 * xy


def test_mmd_and_its_permutation_p_value_match_a_brute_force_computation() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 3)), rng.normal(0.4, 1.0, size=(9, 3))
    bandwidth = median_bandwidth(x)
    assert mmd2(x, y, bandwidth) == pytest.approx(brute_force_mmd2(x, y, bandwidth), rel=1e-9)
    result = mmd_test(x, y, bandwidth=bandwidth, permutations=60, seed=5)
    # The same permutations, drawn the same way, each scored by the brute-force MMD.
    pooled = np.concatenate([x, y])
    draw = np.random.default_rng(5)
    exceeded = 0
    for _ in range(60):
        order = draw.permutation(len(pooled))
        first = np.zeros(len(pooled), dtype=bool)
        first[order[: len(x)]] = True
        permuted = brute_force_mmd2(pooled[first], pooled[~first], bandwidth)
        exceeded += permuted >= result.score - 1e-12
    assert result.score == pytest.approx(brute_force_mmd2(x, y, bandwidth), rel=1e-9)
    assert result.p_value == pytest.approx((1 + exceeded) / 61)


def test_median_bandwidth_is_the_median_distance_between_distinct_rows() -> None:
    x = np.random.default_rng(1).normal(size=(15, 4))
    pairs = [np.linalg.norm(a - b) for a, b in itertools.combinations(x, 2)]
    assert median_bandwidth(x) == pytest.approx(float(np.median(pairs)))


def test_mmd_rarely_alarms_on_the_same_distribution_and_sees_a_shift() -> None:
    rng = np.random.default_rng(2)
    reference = rng.normal(size=(120, 8))
    bandwidth = median_bandwidth(reference)

    def alarms(shift: float, windows: int) -> float:
        count = 0
        for seed in range(windows):
            window = rng.normal(size=(40, 8))
            window[:, 0] += shift
            result = mmd_test(reference, window, bandwidth=bandwidth, permutations=150, seed=seed)
            count += result.p_value < SIGNIFICANCE
        return count / windows

    assert alarms(0.0, windows=120) <= 0.02
    assert alarms(1.0, windows=30) >= 0.9


def test_projection_spans_what_sklearn_pca_finds() -> None:
    rng = np.random.default_rng(3)
    features = rng.normal(size=(80, 20)) * np.linspace(5, 0.5, 20)
    projection = fit_projection(features, dims=4)
    expected = PCA(n_components=4).fit(features)
    assert np.allclose(projection.mean, expected.mean_)
    # Each component is the same direction (up to sign).
    agreement = np.abs(np.sum(projection.components * expected.components_, axis=1))
    assert np.allclose(agreement, 1.0, atol=1e-6)
    assert np.allclose(
        np.abs(projection(features)), np.abs(expected.transform(features)), atol=1e-4
    )
    assert fit_projection(features[:3], dims=32).components.shape == (2, 20)


def test_class_shift_is_the_total_variation_distance_with_a_chi_square_p_value() -> None:
    same = class_shift(np.array([50, 30, 20]), np.array([25, 15, 10]))
    assert same.score == pytest.approx(
        0.5
        * sum(
            abs(a - b)
            for a, b in zip(
                [25 / 50, 15 / 50, 10 / 50], [51 / 103, 31 / 103, 21 / 103], strict=True
            )
        )
    )
    assert same.p_value > 0.5
    moved = class_shift(np.array([50, 30, 20]), np.array([2, 3, 45]))
    assert moved.score > 0.5
    assert moved.p_value < 1e-6


def test_confidence_shift_is_the_kolmogorov_smirnov_test() -> None:
    rng = np.random.default_rng(4)
    reference = rng.beta(8, 2, size=200)
    lower = rng.beta(4, 4, size=50)
    result = confidence_shift(reference, lower)
    # The KS statistic by its definition: the largest gap between the empirical CDFs.
    grid = np.concatenate([reference, lower])
    gap = max(abs(np.mean(reference <= v) - np.mean(lower <= v)) for v in grid)
    assert result.score == pytest.approx(gap)
    assert result.p_value < 1e-3
    assert confidence_shift(reference, rng.beta(8, 2, size=50)).p_value > 0.01


def test_expected_accuracy_from_calibrated_confidences_tracks_the_true_accuracy() -> None:
    # An overconfident model: labels are drawn from softmax(logits / 3), so temperature 3 is
    # its calibration; the raw softmax claims more than it achieves.
    rng = np.random.default_rng(6)
    temperature = 3.0
    logits = rng.normal(scale=6.0, size=(4000, 5))
    truth = calibrated_probabilities(logits, temperature)
    labels = np.array([rng.choice(5, p=row) for row in truth])
    observed = float(np.mean(logits.argmax(axis=1) == labels))
    calibrated = expected_accuracy(calibrated_probabilities(logits, temperature).max(axis=1))
    raw = expected_accuracy(calibrated_probabilities(logits, 1.0).max(axis=1))
    assert calibrated is not None
    assert raw is not None
    assert abs(calibrated - observed) < 0.02
    assert raw - observed > 0.1
    assert expected_accuracy(np.array([])) is None
