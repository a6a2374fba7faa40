"""How images become model input, as the image modality's types hold it (standard library
only: plans and the zoo's descriptions read it without torch)."""

from dataclasses import dataclass
from typing import Any, ClassVar, Self

from ...spec import decode
from ...stages import Plan, Preprocessing
from ..base import ModelInput


@dataclass(frozen=True)
class ImageModelInput(ModelInput):
    """An image base model's input: its default size and its pixel statistics."""

    modality: ClassVar[str] = "image"
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fixed_input_size: bool = False
    """True when the architecture only accepts `input_size` (position embeddings)."""


@dataclass(frozen=True)
class ImagePreprocessing(Preprocessing):
    """A plan's pixel statistics: each channel less `mean`, over `std` (the size is each
    stage's, `Stage.image_size`)."""

    modality: ClassVar[str] = "image"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_flat(cls, data: dict[str, Any]) -> Self:
        return decode(cls, {"mean": data["mean"], "std": data["std"]})


def final_image_size(plan: Plan) -> int:
    """The size the finished model was last trained at, hence the one to predict at."""
    size = plan.stages[-1].image_size
    if size is None:
        raise ValueError(f"{plan.modality} plans have no image size")
    return size
