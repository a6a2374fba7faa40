"""How texts become model input, as the text modality's types hold it (standard library
only: plans and the zoo's descriptions read it without torch)."""

from dataclasses import dataclass
from typing import Any, ClassVar, Self

from ...spec import Truncation, decode
from ...stages import Preprocessing
from ..base import ModelInput


@dataclass(frozen=True)
class TextModelInput(ModelInput):
    """A text base model's input: its token limit and how token states become one vector."""

    modality: ClassVar[str] = "text"
    max_length: int
    """The most tokens an input may have, special tokens included."""
    pooling: str
    """How token states become one feature vector (`mean` over the attention mask)."""


@dataclass(frozen=True)
class TextPreprocessing(Preprocessing):
    """A plan's tokenization: tokens per text (special tokens included), and which tokens a
    longer text keeps."""

    modality: ClassVar[str] = "text"
    max_length: int
    truncation: Truncation

    @classmethod
    def from_flat(cls, data: dict[str, Any]) -> Self:
        # Pixel statistics of zeros stood beside these in a text plan: they are dropped.
        return decode(
            cls,
            {"max_length": data["max_length"], "truncation": data.get("truncation") or "head"},
        )
