"""How images become model input, as the image modality's types hold it (standard library
only: plans and the zoo's descriptions read it without torch)."""

from dataclasses import dataclass
from typing import ClassVar

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
