"""How an exported image model's images become its input, as its `config.json` holds it
(standard library only: MLflow exports ship this module with `artifacts.py`)."""

from dataclasses import dataclass
from typing import Any, ClassVar, Self

from ...artifacts import ExportedPreprocessing
from ...recipe import ORIGINAL_VIEW


@dataclass(frozen=True)
class ExportedImagePreprocessing(ExportedPreprocessing):
    """How images were prepared in training, and so must be prepared for inference."""

    modality: ClassVar[str] = "image"
    # Image models' `preprocessing` has never carried a tag.
    untagged: ClassVar[bool] = True
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "bilinear"
    color: str = "RGB"
    tta: tuple[str, ...] = (ORIGINAL_VIEW,)
    """Test-time augmentation: the views (`pixels.view_pixels`) whose probabilities predict
    averages, as the final validation did (`config.json`'s `preprocessing.tta`)."""

    @classmethod
    def from_config(cls, data: dict[str, Any]) -> Self:
        prep = data["preprocessing"]
        return cls(
            image_size=int(prep["image_size"]),
            mean=_triple(prep["mean"]),
            std=_triple(prep["std"]),
            resize=prep.get("resize", "bilinear"),
            color=prep.get("color", "RGB"),
            tta=_views(prep.get("tta", [ORIGINAL_VIEW])),
        )


def _views(values: Any) -> tuple[str, ...]:
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise ValueError(f"preprocessing.tta must list view names; got {values!r}")
    return tuple(values)


def _triple(values: Any) -> tuple[float, float, float]:
    first, second, third = (float(value) for value in values)
    return (first, second, third)
