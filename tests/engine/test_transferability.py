"""LogME against a straightforward computation, and the linear probe on data with a known answer."""

import math

import numpy as np
import pytest

from worker.engine.transferability import (
    MAX_ITERATIONS,
    TOLERANCE,
    linear_probe_accuracy,
    logme,
)


def _evidence(f: np.ndarray, t: np.ndarray, alpha: float, beta: float) -> float:
    """log p(t | F, alpha, beta) / n for the Bayesian linear model, computed with full matrices."""
    n, d = f.shape
    a = alpha * np.eye(d) + beta * f.T @ f
    m = beta * np.linalg.solve(a, f.T @ t)
    _, log_det = np.linalg.slogdet(a)
    value = (
        n / 2 * math.log(beta)
        + d / 2 * math.log(alpha)
        - n / 2 * math.log(2 * math.pi)
        - beta / 2 * float(np.sum((f @ m - t) ** 2))
        - alpha / 2 * float(m @ m)
        - log_det / 2
    )
    return value / n


def _reference_fixed_point(
    f: np.ndarray, t: np.ndarray, iterations: int = MAX_ITERATIONS
) -> tuple[float, float]:
    """MacKay's updates written out with matrix inverses (gamma = d - alpha tr(A^-1)), with LogME's
    stopping rule."""
    n, d = f.shape
    alpha, beta = 1.0, 1.0
    for _ in range(iterations):
        a = alpha * np.eye(d) + beta * f.T @ f
        m = beta * np.linalg.solve(a, f.T @ t)
        gamma = d - alpha * float(np.trace(np.linalg.inv(a)))
        new_alpha = gamma / max(float(m @ m), 1e-12)
        new_beta = (n - gamma) / max(float(np.sum((f @ m - t) ** 2)), 1e-12)
        settled = abs(new_alpha - alpha) / alpha < TOLERANCE
        settled = settled and abs(new_beta - beta) / beta < TOLERANCE
        alpha, beta = new_alpha, new_beta
        if settled:
            break
    return alpha, beta


def _reference_logme(f: np.ndarray, y: np.ndarray) -> float:
    scores = []
    for label in np.unique(y):
        t = (y == label).astype(np.float64)
        alpha, beta = _reference_fixed_point(f, t)
        scores.append(_evidence(f, t, alpha, beta))
    return float(np.mean(scores))


@pytest.mark.parametrize(("n", "d", "classes"), [(60, 8, 3), (25, 40, 2), (50, 50, 4)])
def test_logme_matches_the_reference_computation(n: int, d: int, classes: int) -> None:
    rng = np.random.default_rng(n * d)
    labels = rng.integers(0, classes, size=n)
    features = rng.normal(size=(n, d)) + labels[:, None] * rng.normal(size=d)

    assert logme(features, labels) == pytest.approx(_reference_logme(features, labels), rel=1e-4)


def test_logme_sits_at_the_maximum_of_the_evidence() -> None:
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, size=80)
    features = rng.normal(size=(80, 6)) + labels[:, None]
    t = (labels == 1).astype(np.float64)
    alpha, beta = _reference_fixed_point(features, t, iterations=1000)
    best = _evidence(features, t, alpha, beta)

    for scale_a in (0.5, 0.9, 1.1, 2.0):
        for scale_b in (0.5, 0.9, 1.1, 2.0):
            assert _evidence(features, t, alpha * scale_a, beta * scale_b) <= best + 1e-9
    other = _evidence(features, 1 - t, *_reference_fixed_point(features, 1 - t, iterations=1000))
    # Capped at LogME's iteration count, the score is within its tolerance of the true maximum.
    assert logme(features, labels) == pytest.approx(np.mean([best, other]), rel=1e-3)


def test_features_that_carry_the_labels_score_higher_than_noise() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, size=90)
    centres = rng.normal(scale=3.0, size=(3, 16))
    informative = centres[labels] + rng.normal(size=(90, 16))
    noise = rng.normal(size=(90, 16))

    assert logme(informative, labels) > logme(noise, labels) + 0.1
    assert linear_probe_accuracy(informative, labels) > 0.9
    assert linear_probe_accuracy(noise, labels) < 0.6


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="two classes"):
        logme(np.ones((4, 2)), np.zeros(4))
    with pytest.raises(ValueError, match="n x d"):
        logme(np.ones((4, 2)), np.zeros(3))
