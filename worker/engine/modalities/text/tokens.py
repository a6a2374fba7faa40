"""Texts to model input with `tokenizers` and numpy alone: what training and predict share.

Standard library, numpy and `tokenizers` only, so the API process prepares a text request
without importing torch or transformers (a version served by ONNX Runtime never loads them).
Texts are tokenized without special tokens, cut to the budget (`head`: the first tokens;
`head_tail`: the first quarter and the last three quarters of the budget, Sun et al. 2019),
then framed as `[CLS] tokens [SEP]`.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TOKENIZER_FILE = "tokenizer.json"
HEAD_SHARE_OF_HEAD_TAIL = 0.25


@dataclass(frozen=True)
class SpecialTokens:
    cls_id: int
    sep_id: int
    pad_id: int
    mask_id: int

    @classmethod
    def of(cls, tokenizer: Any) -> "SpecialTokens":
        """From a `transformers` fast tokenizer."""
        return cls(
            cls_id=int(tokenizer.cls_token_id),
            sep_id=int(tokenizer.sep_token_id),
            pad_id=int(tokenizer.pad_token_id),
            mask_id=int(tokenizer.mask_token_id),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SpecialTokens":
        return cls(**{key: int(data[key]) for key in ("cls_id", "sep_id", "pad_id", "mask_id")})


@dataclass(frozen=True)
class Encoded:
    """Texts as framed token ids, with what truncation did to them."""

    ids: list[list[int]]
    """`[CLS] kept tokens [SEP]` per text, at most `max_length` long."""
    lengths: list[int]
    """Untruncated token counts, special tokens included."""
    truncated: list[bool]


def keep(tokens: Sequence[int], budget: int, truncation: str) -> list[int]:
    """At most `budget` of `tokens`: the first ones, or (`head_tail`) the first and the last."""
    if len(tokens) <= budget:
        return list(tokens)
    if truncation == "head_tail":
        head = int(budget * HEAD_SHARE_OF_HEAD_TAIL)
        tail = budget - head
        return [*tokens[:head], *tokens[len(tokens) - tail :]]
    return list(tokens[:budget])


def encode(
    backend: Any,
    texts: Sequence[str],
    special: SpecialTokens,
    *,
    max_length: int,
    truncation: str,
) -> Encoded:
    """Tokenize with a `tokenizers.Tokenizer` (no special tokens, no truncation of its own)."""
    budget = max_length - 2
    rows = [
        encoding.ids for encoding in backend.encode_batch(list(texts), add_special_tokens=False)
    ]
    return Encoded(
        ids=[[special.cls_id, *keep(row, budget, truncation), special.sep_id] for row in rows],
        lengths=[len(row) + 2 for row in rows],
        truncated=[len(row) > budget for row in rows],
    )


def plain_backend(backend: Any) -> Any:
    """A copy of a `tokenizers.Tokenizer` with its own truncation and padding turned off."""
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy


def load_backend(folder: Path) -> Any:
    """An exported model's tokenizer (`tokenizer.json`), ready for `encode`."""
    from tokenizers import Tokenizer

    return plain_backend(Tokenizer.from_file(str(folder / TOKENIZER_FILE)))


def pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, L) int64 ids padded to the longest row, and the (N, L) int64 attention mask."""
    width = max(len(row) for row in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = row
        mask[index, : len(row)] = 1
    return ids, mask
