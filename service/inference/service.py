"""Inference: load a version's artifacts once, keep a few loaded, predict per image."""

import io
import threading
from collections import OrderedDict

from PIL import Image

from service.datasets.ingest import ImageRejectedError, IngestLimits, open_image
from service.inference.schemas import ImageError, ImagePrediction, LabelScore
from service.storage import ArtifactStore
from service.tables import ModelVersion
from worker.engine import Predictor


class PredictorCache:
    """Least-recently-used cache of loaded models, keyed by version id (versions are immutable)."""

    def __init__(self, *, store: ArtifactStore, capacity: int) -> None:
        self.store = store
        self.capacity = capacity
        self._loaded: OrderedDict[str, Predictor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, version: ModelVersion) -> Predictor:
        with self._lock:
            predictor = self._loaded.get(version.id)
            if predictor is not None:
                self._loaded.move_to_end(version.id)
                return predictor
        # Loading happens outside the lock so one slow load does not stall other models.
        predictor = Predictor.load(self.store.local_path(version.artifact_prefix))
        with self._lock:
            self._loaded[version.id] = predictor
            self._loaded.move_to_end(version.id)
            while len(self._loaded) > self.capacity:
                self._loaded.popitem(last=False)
        return predictor


def predict_images(
    predictor: Predictor,
    images: list[tuple[str, bytes]],
    *,
    top_k: int,
    limits: IngestLimits,
) -> list[ImagePrediction]:
    """Per-image answers in the order sent; a bad image gets an error entry, the rest still run."""
    decoded: list[tuple[int, Image.Image]] = []
    results: list[ImagePrediction] = [ImagePrediction(image=name) for name, _ in images]
    for index, (_, data) in enumerate(images):
        try:
            decoded.append((index, open_image(io.BytesIO(data), limits)))
        except ImageRejectedError as exc:
            results[index].error = ImageError(code=exc.code, message=exc.reason)
    if decoded:
        tops = predictor.predict([image for _, image in decoded], top_k=top_k)
        for (index, _), top in zip(decoded, tops, strict=True):
            results[index].top = [LabelScore(label=label, probability=p) for label, p in top]
    return results
