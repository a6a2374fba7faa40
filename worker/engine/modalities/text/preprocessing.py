"""How texts become model input, as the text modality's types hold it (standard library
only: plans and the zoo's descriptions read it without torch)."""

from dataclasses import dataclass
from typing import ClassVar

from ..base import ModelInput


@dataclass(frozen=True)
class TextModelInput(ModelInput):
    """A text base model's input: its token limit and how token states become one vector."""

    modality: ClassVar[str] = "text"
    max_length: int
    """The most tokens an input may have, special tokens included."""
    pooling: str
    """How token states become one feature vector (`mean` over the attention mask)."""


NO_PIXELS = (0.0, 0.0, 0.0)
"""A text plan's `mean` and `std` (it has no pixels)."""
