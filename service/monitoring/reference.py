"""A version's reference profile, computed at publish from its own training and validation
items in the space predict decides in, and the per-prediction summary both it and predict
traffic are reduced to.

Stored as `monitoring_reference.npz` beside the weights: the PCA projection (fitted on training
items' features), the reduced features of a bounded sample of validation items (the shift
test's reference), their predicted classes and calibrated confidences, their accuracy and the
kernel width.
"""

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.datasets.ingest import IngestLimits
from service.monitoring import statistics
from worker.engine.modalities.base import average_views

logger = logging.getLogger(__name__)

REFERENCE_FILE = "monitoring_reference.npz"
REFERENCE_ROWS = 500
"""At most this many validation items form the reference, and as many training items fit the
projection."""
REFERENCE_DIMS = 32
"""The reduced space's dimensions."""
MIN_REFERENCE_ROWS = 8
"""With fewer validation items there is no reference: the test would have no power."""
BATCH = 64


@dataclass(frozen=True)
class Reference:
    labels: list[str]
    """The newest task's labels, in the order of its logits."""
    projection: statistics.Projection
    features: np.ndarray
    """(n, dims) reduced features of the validation sample."""
    predicted: np.ndarray
    """(n,) predicted class index per validation item."""
    confidences: np.ndarray
    """(n,) calibrated top probability per validation item."""
    accuracy: float
    """Accuracy on the validation sample."""
    bandwidth: float

    @property
    def class_counts(self) -> np.ndarray:
        return np.bincount(self.predicted, minlength=len(self.labels))

    @property
    def expected_accuracy(self) -> float:
        return float(self.confidences.mean())

    def save(self, path: Path) -> None:
        np.savez(
            path,
            labels=np.array(self.labels),
            mean=self.projection.mean,
            components=self.projection.components,
            features=self.features,
            predicted=self.predicted,
            confidences=self.confidences,
            accuracy=np.array(self.accuracy),
            bandwidth=np.array(self.bandwidth),
        )

    @classmethod
    def load(cls, path: Path) -> "Reference":
        with np.load(path, allow_pickle=False) as data:
            return cls(
                labels=[str(label) for label in data["labels"]],
                projection=statistics.Projection(data["mean"], data["components"]),
                features=data["features"],
                predicted=data["predicted"],
                confidences=data["confidences"],
                accuracy=float(data["accuracy"]),
                bandwidth=float(data["bandwidth"]),
            )


@dataclass(frozen=True)
class Summary:
    """What monitoring keeps of a batch of predictions, a row per input, for the newest task."""

    features: np.ndarray | None
    """(N, feature_dim) pooled features averaged over an image's test-time views."""
    probabilities: np.ndarray
    """(N, classes) calibrated probabilities as predict answers them."""


def summarise(model: Any, outputs: Any) -> Summary:
    """`outputs` of `model`'s forward pass (a `LoadedModel`'s `Outputs`), reduced to one row per
    input: an image's test-time views averaged, as `fill_predictions` does."""
    views = model.inputs.views
    probabilities = average_views(
        statistics.calibrated_probabilities(outputs.logits[-1], model.temperatures[-1]), views
    )
    features = None
    if outputs.features is not None:
        features = average_views(np.asarray(outputs.features, dtype=np.float32), views)
    return Summary(features=features, probabilities=probabilities)


def _summarise_items(model: Any, items: Sequence[Any], limits: IngestLimits) -> Summary:
    # Imported here: the worker imports this module, the API's inference path need not.
    from service.inference.service import ItemReader

    # A training item is read whole: its length was the training's to cap.
    reading = ItemReader(limits, max_text_chars=10**9)
    features: list[np.ndarray] = []
    probabilities: list[np.ndarray] = []
    for start in range(0, len(items), BATCH):
        chunk = [model.inputs.sample_item(item) for item in items[start : start + BATCH]]
        _, good, inputs = model.inputs.prepare(chunk, reading)
        if len(good) != len(chunk) or inputs is None:
            raise ValueError("a training item could not be read as predict reads it")
        summary = summarise(model, model.forward(model.batch_input([inputs])))
        assert summary.features is not None
        features.append(summary.features)
        probabilities.append(summary.probabilities)
    return Summary(np.concatenate(features), np.concatenate(probabilities))


def build_reference(
    model_dir: Path,
    *,
    model: Any,
    train: Sequence[Any],
    val: Sequence[Any],
    limits: IngestLimits,
    seed: int = 0,
) -> Reference | None:
    """The reference profile of the exported model in `model_dir` (`model`: the trained module
    whose weights it holds): None when the validation set is too small to test against."""
    from service.inference.service import load_in_memory

    if len(val) < MIN_REFERENCE_ROWS or len(train) < 2:
        return None
    rng = random.Random(seed)
    val_sample = rng.sample(list(val), min(REFERENCE_ROWS, len(val)))
    train_sample = rng.sample(list(train), min(REFERENCE_ROWS, len(train)))
    loaded = load_in_memory(model_dir, model=model, version_id="reference")
    fitting = _summarise_items(loaded, train_sample, limits)
    assert fitting.features is not None
    projection = statistics.fit_projection(fitting.features, REFERENCE_DIMS)
    held = _summarise_items(loaded, val_sample, limits)
    assert held.features is not None
    reduced = projection(held.features)
    predicted = held.probabilities.argmax(axis=1)
    truth = np.array([item.label for item in val_sample])
    return Reference(
        labels=list(loaded.tasks.values())[-1],
        projection=projection,
        features=reduced,
        predicted=predicted,
        confidences=held.probabilities.max(axis=1),
        accuracy=float(np.mean(predicted == truth)),
        bandwidth=statistics.median_bandwidth(reduced),
    )


def write_reference(out_dir: Path, **kwargs: Any) -> dict[str, Any]:
    """Build the reference (`build_reference`'s arguments) and save it in `out_dir`; what to
    record in the version's `exports["monitoring"]`. Never raises: a version without a
    reference is still served, and its monitoring says why it has none."""
    try:
        reference = build_reference(out_dir, **kwargs)
    except Exception as exc:
        logger.exception("no monitoring reference for %s", out_dir)
        return {"reference": False, "reason": f"{type(exc).__name__}: {exc}"}
    if reference is None:
        return {"reference": False, "reason": f"fewer than {MIN_REFERENCE_ROWS} validation items"}
    reference.save(out_dir / REFERENCE_FILE)
    return {
        "reference": True,
        "rows": len(reference.features),
        "dims": int(reference.features.shape[1]),
        "validation_accuracy": reference.accuracy,
        "validation_expected_accuracy": reference.expected_accuracy,
    }
