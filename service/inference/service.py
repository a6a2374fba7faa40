"""Inference: load a version's artifacts once, keep a few loaded, predict per image."""

import io
import threading
import warnings
from collections import OrderedDict

from PIL import Image, UnidentifiedImageError

from service.datasets.ingest import IngestLimits
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


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Open an image with the ingest allowlist and pixel cap; raises ValueError with a reason."""
    allowed = IngestLimits().allowed_formats
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=sorted(allowed))
            if image.width * image.height > max_pixels:
                raise ValueError(
                    f"{image.width}x{image.height} pixels is over the {max_pixels}-pixel limit"
                )
            image.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(
            f"not an image in an accepted format ({', '.join(sorted(allowed))})"
        ) from None
    except OSError as exc:
        raise ValueError(f"the image could not be decoded: {exc}") from None
    return image


def predict_images(
    predictor: Predictor,
    images: list[tuple[str, bytes]],
    *,
    top_k: int,
    max_pixels: int,
) -> list[ImagePrediction]:
    """Per-image answers in the order sent; a bad image gets an error entry, the rest still run."""
    decoded: list[tuple[int, Image.Image]] = []
    results: list[ImagePrediction] = [ImagePrediction(image=name) for name, _ in images]
    for index, (_, data) in enumerate(images):
        try:
            decoded.append((index, decode_image(data, max_pixels=max_pixels)))
        except ValueError as exc:
            results[index].error = ImageError(code="invalid_image", message=str(exc))
    if decoded:
        tops = predictor.predict([image for _, image in decoded], top_k=top_k)
        for (index, _), top in zip(decoded, tops, strict=True):
            results[index].top = [LabelScore(label=label, probability=p) for label, p in top]
    return results
