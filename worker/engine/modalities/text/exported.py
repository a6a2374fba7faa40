"""How an exported text model's texts become its input, and its encoder's architecture, as
its `config.json` holds them (standard library only: MLflow exports ship this module with
`artifacts.py`)."""

from dataclasses import dataclass
from typing import Any, ClassVar, Self

from ...artifacts import ExportedPreprocessing


@dataclass(frozen=True)
class ExportedTextPreprocessing(ExportedPreprocessing):
    """How texts were tokenized in training, and so must be for inference (see `tokens.py`),
    and the encoder they go through."""

    modality: ClassVar[str] = "text"
    tokenizer: str
    """The tokenizer file in the model folder."""
    max_length: int
    truncation: str
    pooling: str
    special_tokens: dict[str, int]
    """`cls_id`, `sep_id`, `pad_id`, `mask_id`."""
    encoder: dict[str, Any]
    """The `transformers` encoder config (its architecture, without weights): `config.json`'s
    `architecture.encoder`."""

    @classmethod
    def from_config(cls, data: dict[str, Any]) -> Self:
        prep = data["preprocessing"]
        return cls(
            tokenizer=str(prep["tokenizer"]),
            max_length=int(prep["max_length"]),
            truncation=str(prep["truncation"]),
            pooling=str(prep["pooling"]),
            special_tokens={key: int(value) for key, value in prep["special_tokens"].items()},
            encoder=dict(data["architecture"]["encoder"]),
        )
