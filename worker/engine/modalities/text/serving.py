"""Serving a text model: a call's texts tokenized in the decode pool (the tokenizer works
outside the GIL), then padded to the longest text of the batch the batcher gathers. Numpy
and tokenizers only: the API's inference path imports no torch."""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...artifacts import ONNX_TEXT_INPUTS, ModelConfig
from ..base import ItemReading, OipInput, PredictCaps, Prepared, bytes_tensor_elements
from .exported import ExportedTextPreprocessing
from .tokens import SpecialTokens, encode, load_backend, pad

TEXTS = "texts"
"""The Open Inference Protocol input of texts (BYTES, UTF-8)."""

PREPROCESSING = ExportedTextPreprocessing
"""Its models' kind of `config.json`'s `preprocessing` (an MLflow pyfunc reads it so)."""


def onnx_inputs(config: ModelConfig) -> list[tuple[str, str, list[int]]]:
    return [(name, "INT64", [-1]) for name in ONNX_TEXT_INPUTS]


def oip_inputs(config: ModelConfig) -> list[dict[str, Any]]:
    return [{"name": TEXTS, "datatype": "BYTES", "shape": [-1]}]


def served_inputs(config: ModelConfig, model_dir: Path) -> "ServedTexts":
    """With the model's tokenizer, from `model_dir`."""
    return ServedTexts(ExportedTextPreprocessing.of(config), load_backend(model_dir))


@dataclass(frozen=True)
class ServedTexts:
    text: ExportedTextPreprocessing
    tokenizer: Any
    """The model's `tokenizers.Tokenizer`."""
    modality = "text"
    oip_input_names = (TEXTS,)
    views = 1

    def warm_up_input(self) -> tuple[np.ndarray, np.ndarray]:
        return np.ones((1, 2), dtype=np.int64), np.ones((1, 2), dtype=np.int64)

    def prepare(self, items: Sequence[str], reading: ItemReading) -> Prepared:
        """Per-text results (errors filled in, and whether each was truncated), the indexes
        that encoded, and their framed token ids."""
        results: list[dict[str, Any]] = [
            {"text_index": index, "top": None, "truncated": None, "error": None}
            for index in range(len(items))
        ]
        good: list[int] = []
        max_chars = reading.max_text_chars
        for index, text in enumerate(items):
            if not text.strip():
                results[index]["error"] = {"code": "empty_text", "message": "The text is empty."}
            elif len(text) > max_chars:
                results[index]["error"] = {
                    "code": "text_too_long",
                    "message": f"The text has {len(text)} characters; at most {max_chars} are "
                    "read (THAW_MAX_PREDICT_TEXT_CHARS).",
                }
            else:
                good.append(index)
        ids, notes = self.read([items[index] for index in good])
        for index, note in zip(good, notes, strict=True):
            results[index].update(note)
        return Prepared(results, good, ids)

    def read(self, items: Sequence[Any]) -> tuple[list[list[int]], list[dict[str, Any]]]:
        """Texts tokenized and truncated as in training, and whether each was truncated."""
        for item in items:
            if not isinstance(item, str):
                raise ValueError(f"this text model takes texts, not {type(item).__name__}")
        encoded = encode(
            self.tokenizer,
            items,
            SpecialTokens.from_dict(self.text.special_tokens),
            max_length=self.text.max_length,
            truncation=self.text.truncation,
        )
        return encoded.ids, [{"truncated": truncated} for truncated in encoded.truncated]

    def batch_input(self, blocks: list[list[list[int]]]) -> tuple[np.ndarray, np.ndarray]:
        """Token rows padded to the longest of them."""
        rows = [row for block in blocks for row in block]
        return pad(rows, self.text.special_tokens["pad_id"])

    def onnx_feed(self, batch: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
        return dict(zip(ONNX_TEXT_INPUTS, batch, strict=True))

    def sample_item(self, sample: Any) -> str:
        return str(sample.text)

    def kept_bytes(self, item: str) -> bytes:
        return item.encode()

    def body_cap(self, caps: PredictCaps) -> int:
        per_input = caps.max_predict_text_chars * 4 + 1024
        return caps.max_predict_texts * per_input + 65536

    def oip_input(self, tensor: Any, caps: PredictCaps) -> OipInput:
        try:
            texts = [element.decode() for element in bytes_tensor_elements(tensor)]
        except UnicodeDecodeError:
            raise ValueError(f"Input {TEXTS!r}: a text is not UTF-8.") from None
        return OipInput(
            texts, preprocessed=False, views=1, limit=caps.max_predict_texts, item="text"
        )
