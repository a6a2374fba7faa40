"""How well a frozen backbone's features suit a labelled dataset, before any training.

LogME (You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer Learning",
ICML 2021) scores features by the log marginal likelihood (evidence) of a Bayesian linear model
from features to each one-hot label column, with the prior precision `alpha` and noise precision
`beta` set to maximise that evidence by the paper's fixed-point iteration. Higher is better; the
score is per sample, averaged over classes, so datasets of different sizes compare.

The linear probe is the plain check beside it: cross-validated accuracy of a linear (ridge)
classifier on the same features.
"""

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .modalities import modality_for
from .zoo import get_base_model_info

MAX_ITERATIONS = 11
TOLERANCE = 1e-3
"""As in the authors' implementation (github.com/thuml/LogME): the fixed point settles within
about ten steps; where it would not (features that fit the labels exactly, so the noise
precision grows without bound) the cap keeps the score finite and comparable."""


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """The LogME score of `features` (n x d) for integer `labels` (n)."""
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if f.ndim != 2 or y.shape != (f.shape[0],):
        raise ValueError(f"features must be n x d and labels n; got {f.shape} and {y.shape}")
    classes = np.unique(y)
    if len(classes) < 2:
        raise ValueError("LogME needs at least two classes")
    # One SVD serves every class: with F = U diag(s) V^T, A = alpha I + beta F^T F is diagonal
    # in V's basis.
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma = s**2
    scores = [_class_evidence(u, sigma, f.shape, (y == c).astype(np.float64)) for c in classes]
    return float(np.mean(scores))


def _class_evidence(
    u: np.ndarray, sigma: np.ndarray, shape: tuple[int, int], target: np.ndarray
) -> float:
    """Maximised evidence per sample for one one-hot column `target`."""
    n, d = shape
    projected = u.T @ target  # the target in the left singular basis
    # What of the target lies outside F's column space is never fitted, whatever m is.
    residual_outside = max(float(target @ target - projected @ projected), 0.0)
    alpha, beta = 1.0, 1.0
    for _ in range(MAX_ITERATIONS):
        shrink = beta * sigma / (alpha + beta * sigma)
        gamma = float(shrink.sum())
        # m = beta A^-1 F^T y; in V's basis, m_i = beta s_i (U^T y)_i / (alpha + beta s_i^2).
        m_norm2 = float(np.sum((beta * np.sqrt(sigma) * projected / (alpha + beta * sigma)) ** 2))
        fit_error = float(np.sum(((1 - shrink) * projected) ** 2)) + residual_outside
        new_alpha = gamma / max(m_norm2, 1e-12)
        new_beta = (n - gamma) / max(fit_error, 1e-12)
        converged = abs(new_alpha - alpha) / alpha < TOLERANCE and (
            abs(new_beta - beta) / beta < TOLERANCE
        )
        alpha, beta = new_alpha, new_beta
        if converged:
            break
    shrink = beta * sigma / (alpha + beta * sigma)
    m_norm2 = float(np.sum((beta * np.sqrt(sigma) * projected / (alpha + beta * sigma)) ** 2))
    fit_error = float(np.sum(((1 - shrink) * projected) ** 2)) + residual_outside
    # log|A| over all d dimensions: those F does not reach contribute log alpha each.
    log_det = float(np.sum(np.log(alpha + beta * sigma))) + (d - len(sigma)) * math.log(alpha)
    evidence = (
        n / 2 * math.log(beta)
        + d / 2 * math.log(alpha)
        - n / 2 * math.log(2 * math.pi)
        - beta / 2 * fit_error
        - alpha / 2 * m_norm2
        - log_det / 2
    )
    return evidence / n


@dataclass(frozen=True)
class GroupScore:
    group: str
    logme: float
    """LogME of the features pooled after this group: where it peaks, features turn from
    general to specific to the pretraining task."""


@dataclass(frozen=True)
class Transferability:
    base_model: str
    images: int
    logme: float
    """Of the backbone's pooled output, the features a head is trained on."""
    linear_probe_accuracy: float
    groups: tuple[GroupScore, ...]
    suggested_partial_groups: int
    """How many top groups to train with `partial`: those after the group where LogME peaks
    (at least one)."""
    seconds: float


def score_base_model(
    base_model: str,
    samples: Sequence[Any],
    *,
    weights_dir: Path | None,
    image_size: int | None = None,
    max_length: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
) -> Transferability:
    """Score a zoo backbone's pretrained features for `samples` (its modality's: images, or
    texts tokenized to `max_length`) from one forward pass each."""
    started = time.perf_counter()
    info = get_base_model_info(base_model)
    pooled, by_group = modality_for(info.modality).pooled_features(
        info,
        samples,
        weights_dir=weights_dir,
        image_size=image_size,
        max_length=max_length,
        batch_size=batch_size,
        on_progress=on_progress,
    )
    labels = np.array([sample.label for sample in samples])
    groups = tuple(GroupScore(group=name, logme=logme(f, labels)) for name, f in by_group.items())
    peak = int(np.argmax([group.logme for group in groups])) if groups else len(groups) - 1
    return Transferability(
        base_model=base_model,
        images=len(samples),
        logme=logme(pooled, labels),
        linear_probe_accuracy=linear_probe_accuracy(pooled, labels, seed=seed),
        groups=groups,
        suggested_partial_groups=max(1, len(groups) - 1 - peak),
        seconds=round(time.perf_counter() - started, 3),
    )


def linear_probe_accuracy(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    folds: int = 5,
    seed: int = 0,
    ridge: float = 1.0,
) -> float:
    """Mean held-out accuracy, over `folds` stratified folds, of a ridge-regression probe from
    standardised features to one-hot labels (closed form: milliseconds, where an iterative
    logistic regression takes seconds per fold on a busy CPU)."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    classes = np.unique(y)
    fold_of = _stratified_folds(y, folds, seed)
    accuracies = []
    for fold in range(folds):
        held_out = fold_of == fold
        if not held_out.any() or held_out.all():
            continue
        train_x, train_y = x[~held_out], y[~held_out]
        mean, scale = train_x.mean(axis=0), train_x.std(axis=0) + 1e-6
        weights = _ridge(
            (train_x - mean) / scale, (train_y[:, None] == classes).astype(float), ridge
        )
        predicted = classes[(((x[held_out] - mean) / scale) @ weights).argmax(axis=1)]
        accuracies.append(float(np.mean(predicted == y[held_out])))
    if not accuracies:
        raise ValueError("too few samples for a cross-validated linear probe")
    return float(np.mean(accuracies))


def _ridge(x: np.ndarray, targets: np.ndarray, ridge: float) -> np.ndarray:
    """argmin |xW - targets|^2 + ridge|W|^2, in whichever of the primal or dual form is smaller."""
    n, d = x.shape
    if d <= n:
        return np.linalg.solve(x.T @ x + ridge * np.eye(d), x.T @ targets)
    return x.T @ np.linalg.solve(x @ x.T + ridge * np.eye(n), targets)


def _stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """A fold number per sample, each class dealt round-robin over the folds after a shuffle."""
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        fold_of[members] = np.arange(len(members)) % folds
    return fold_of


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b between two scorings of the same items: how well a transferability score
    (x) ranks base models as their fine-tuned accuracy (y) does. +1 the same order, -1 reversed;
    tau-b counts tied pairs as neither agreeing nor disagreeing and rescales for them."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError("Kendall's tau needs two equally long sequences of at least two scores")
    upper = np.triu_indices(len(a), k=1)
    da = np.sign(a[:, None] - a[None, :])[upper]
    db = np.sign(b[:, None] - b[None, :])[upper]
    untied_a, untied_b = np.count_nonzero(da), np.count_nonzero(db)
    if untied_a == 0 or untied_b == 0:
        raise ValueError("Kendall's tau is undefined when every score is the same")
    return float(np.sum(da * db) / math.sqrt(untied_a * untied_b))
