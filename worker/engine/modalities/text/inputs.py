"""Text as training input: samples, tokenized once, batched by similar length.

`TextInputs` is the text side of the modality interface (`modalities.Inputs`): it tokenizes
the run's texts once (per tokenizer, length and truncation) and hands out loaders whose
batches are one int64 tensor (B, 2, L), ids and attention mask, padded to the longest text
of the batch. Shuffled loaders draw a permutation from the run's shuffle stream, sort each
window of `SORT_WINDOW` batches by length and cut it into batches, so padding stays small
and a resumed run redraws exactly the same batches. ulmfit's masked-LM stage gets its
batches here too (`language_model`).
"""

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ...plan import Plan, Stage
from ...zoo import Backbone
from .preprocessing import TextModelInput, TextPreprocessing
from .token_cache import EntryCache, cached_encode
from .tokens import Encoded, SpecialTokens, encode, pad, plain_backend
from .zoo import TextBackbone, load_tokenizer, text_info

SORT_WINDOW = 8
"""Batches per window sorted by length: the shuffle stays coarse, the padding small."""
MASK_PROBABILITY = 0.15
IGNORED = -100
"""The target of a token the masked-LM loss skips (cross-entropy's ignore_index)."""


@dataclass(frozen=True)
class TextSample:
    text: str
    label: int


def token_lengths(
    base_model: str, texts: Sequence[str], weights_dir: Path | None = None
) -> list[int]:
    """Untruncated token counts of `texts`, special tokens included, for `base_model`."""
    tokenizer = load_tokenizer(base_model, weights_dir)
    backend = plain_backend(tokenizer.backend_tokenizer)
    extra = tokenizer.num_special_tokens_to_add(pair=False)
    return [
        len(encoding.ids) + extra
        for encoding in backend.encode_batch(list(texts), add_special_tokens=False)
    ]


def token_limit(base_model: str) -> int:
    """The most tokens `base_model` reads, special tokens included."""
    return TextModelInput.of(text_info(base_model)).max_length


class _Rows(Dataset[tuple[list[int], Any]]):
    """Framed token ids with their targets (a label, or a label and LwF's recorded outputs)."""

    def __init__(self, ids: list[list[int]], targets: Sequence[Any]) -> None:
        self.ids = ids
        self.targets = targets

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[list[int], Any]:
        return self.ids[index], self.targets[index]


class LengthGroupedBatches(Sampler[list[int]]):
    """Batches of indices of similar length. Shuffled (`generator` given): sorted within
    windows of a random permutation. Unshuffled (evaluation, feature passes): every index
    sorted by length, longest first, which pads least; `order` then lists the indices in the
    order the batches yield them, so callers can put results back in sample order
    (`loop.in_sample_order`)."""

    def __init__(
        self, lengths: Sequence[int], batch_size: int, generator: torch.Generator | None
    ) -> None:
        self.lengths = lengths
        self.batch_size = batch_size
        self.generator = generator
        self.order: list[int] | None = (
            sorted(range(len(lengths)), key=lambda i: -lengths[i]) if generator is None else None
        )

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        count, size = len(self.lengths), self.batch_size
        if self.order is not None:
            yield from (self.order[i : i + size] for i in range(0, count, size))
            return
        assert self.generator is not None
        order = torch.randperm(count, generator=self.generator).tolist()
        window = size * SORT_WINDOW
        for start in range(0, count, window):
            chunk = sorted(order[start : start + window], key=lambda i: -self.lengths[i])
            yield from (chunk[i : i + size] for i in range(0, len(chunk), size))


def _pack(rows: Sequence[Sequence[int]], pad_id: int) -> Tensor:
    ids, mask = pad(rows, pad_id)
    return torch.stack([torch.from_numpy(ids), torch.from_numpy(mask)], dim=1)


class _Collate:
    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[tuple[list[int], Any]]) -> tuple[Tensor, Any]:
        inputs = _pack([ids for ids, _ in items], self.pad_id)
        targets = [target for _, target in items]
        if isinstance(targets[0], tuple):  # LwF: (label, the parent's recorded outputs)
            labels = torch.tensor([label for label, _ in targets])
            return inputs, (labels, torch.stack([recorded for _, recorded in targets]))
        return inputs, torch.tensor(targets)


class _Masking:
    """Collates texts into masked-LM batches: BERT's 15 % of tokens (80 % [MASK], 10 % a
    random token, 10 % kept), drawn from `generator`; the targets are the masked tokens."""

    def __init__(self, special: SpecialTokens, vocab_size: int, generator: torch.Generator) -> None:
        self.special = special
        self.vocab_size = vocab_size
        self.generator = generator

    def __call__(self, items: list[tuple[list[int], Any]]) -> tuple[Tensor, Tensor]:
        packed = _pack([ids for ids, _ in items], self.special.pad_id)
        ids, mask = packed[:, 0], packed[:, 1]
        maskable = mask.bool() & (ids != self.special.cls_id) & (ids != self.special.sep_id)
        draw = torch.rand(ids.shape, generator=self.generator)
        chosen = maskable & (draw < MASK_PROBABILITY)
        if not chosen.any():
            # Every batch needs a target; take the first maskable token.
            chosen.view(-1)[int(maskable.view(-1).nonzero()[0])] = True
        how = torch.rand(ids.shape, generator=self.generator)
        random_tokens = torch.randint(self.vocab_size, ids.shape, generator=self.generator)
        masked = ids.clone()
        masked[chosen & (how < 0.8)] = self.special.mask_id
        swap = chosen & (how >= 0.8) & (how < 0.9)
        masked[swap] = random_tokens[swap]
        labels = torch.where(chosen, ids, torch.full_like(ids, IGNORED))
        return torch.stack([masked, mask, labels], dim=1), ids[chosen]


class MaskedLanguageModel(nn.Module):
    """The encoder with the LM head: (B, 3, L) masked ids, mask, labels → the masked tokens'
    vocabulary logits, in row-major order (the order `_Masking` lists their targets)."""

    def __init__(self, backbone: TextBackbone, lm_head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.lm_head = lm_head

    def forward(self, inputs: Tensor) -> Tensor:
        hidden = self.backbone.hidden_states(inputs[:, :2])
        chosen = inputs[:, 2] != IGNORED
        logits: Tensor = self.lm_head(hidden[chosen], self.backbone.word_embeddings)
        return logits


class TextInputs:
    """Loaders over a run's texts, tokenized once when the run starts, or read from
    `token_cache` when a run on this host already tokenized the same texts alike."""

    def __init__(
        self,
        plan: Plan,
        train: Sequence[TextSample],
        val: Sequence[TextSample],
        *,
        unlabelled: Sequence[str],
        weights_dir: Path | None,
        shuffle: torch.Generator,
        token_cache: EntryCache | None = None,
    ) -> None:
        self.plan = plan
        self.shuffle = shuffle
        tokenizer = load_tokenizer(plan.base_model, weights_dir)
        self.special = SpecialTokens.of(tokenizer)
        self.vocab_size = len(tokenizer)
        backend = plain_backend(tokenizer.backend_tokenizer)
        texts = [sample.text for sample in [*train, *val]] + list(unlabelled)
        tokens = TextPreprocessing.of(plan)
        max_length, truncation = tokens.max_length, tokens.truncation
        encoded = cached_encode(
            token_cache,
            backend,
            texts,
            max_length=max_length,
            truncation=truncation,
            tokenize=lambda: encode(
                backend, texts, self.special, max_length=max_length, truncation=truncation
            ),
        )
        self.encoded: dict[int, Encoded] = {}
        """Framed ids per sample list, by the list's identity (train, val)."""
        first_val, first_unlabelled = len(train), len(train) + len(val)
        self.splits = {
            "train": self._register(train, encoded, 0, first_val),
            "val": self._register(val, encoded, first_val, first_unlabelled),
        }
        self.unlabelled_ids = encoded.ids[first_unlabelled:]

    def _register(
        self, samples: Sequence[TextSample], encoded: Encoded, start: int, end: int
    ) -> Encoded:
        part = Encoded(
            encoded.ids[start:end], encoded.lengths[start:end], encoded.truncated[start:end]
        )
        self.encoded[id(samples)] = part
        return part

    def _ids(self, samples: Sequence[Any]) -> list[list[int]]:
        return self.encoded[id(samples)].ids

    def batches(
        self,
        samples: Sequence[Any],
        stage: Stage,
        *,
        shuffled: bool,
        recorded: Tensor | None = None,
    ) -> DataLoader[Any]:
        ids = self._ids(samples)
        labels = [sample.label for sample in samples]
        targets: Sequence[Any] = (
            labels if recorded is None else list(zip(labels, recorded, strict=True))
        )
        return self._loader(_Rows(ids, targets), ids, _Collate(self.special.pad_id), shuffled)

    def _loader(
        self, rows: _Rows, ids: list[list[int]], collate: Any, shuffled: bool
    ) -> DataLoader[Any]:
        return DataLoader(
            rows,
            batch_sampler=LengthGroupedBatches(
                [len(row) for row in ids], self.plan.batch_size, self.shuffle if shuffled else None
            ),
            collate_fn=collate,
            generator=self.shuffle if shuffled else None,
        )

    def view_batches(self, samples: Sequence[Any], stage: Stage, view: int) -> DataLoader[Any]:
        raise ValueError("texts are not augmented: they have no cached views")

    def language_model(
        self,
        backbone: Backbone,
        lm_head: nn.Module,
        train: Sequence[Any],
        val: Sequence[Any],
    ) -> tuple[nn.Module, DataLoader[Any], DataLoader[Any]]:
        """ulmfit's LM stage: the module it trains, and its masked batches on the training
        texts plus the unlabelled ones (masks drawn from the shuffle stream), and on the
        validation texts (masks drawn once from the seed, so epochs compare)."""
        assert isinstance(backbone, TextBackbone)
        train_ids = [*self._ids(train), *self.unlabelled_ids]
        val_ids = self._ids(val)
        masking = _Masking(self.special, self.vocab_size, self.shuffle)
        val_masking = _Masking(
            self.special, self.vocab_size, torch.Generator().manual_seed(self.plan.seed)
        )
        fixed_val = [val_masking([(row, None)]) for row in val_ids]
        return (
            MaskedLanguageModel(backbone, lm_head),
            self._loader(_Rows(train_ids, [None] * len(train_ids)), train_ids, masking, True),
            DataLoader(_FixedBatches(fixed_val, self.plan.batch_size), batch_size=None),
        )

    def describe(self) -> dict[str, Any]:
        """Token lengths (untruncated, special tokens included) of the train and val texts."""
        return {
            "token_lengths": {
                "max_length": TextPreprocessing.of(self.plan).max_length,
                "truncation": TextPreprocessing.of(self.plan).truncation,
                **{split: _length_stats(encoded) for split, encoded in self.splits.items()},
            }
        }

    def steps(self, samples: Sequence[Any], stage: Stage) -> int:
        count = len(samples) + (len(self.unlabelled_ids) if stage.objective != "classify" else 0)
        return math.ceil(count / self.plan.batch_size)


def _length_stats(encoded: Encoded) -> dict[str, Any]:
    lengths = sorted(encoded.lengths)
    return {
        "texts": len(lengths),
        "min": lengths[0],
        "median": lengths[len(lengths) // 2],
        "p95": lengths[min(len(lengths) - 1, math.ceil(0.95 * len(lengths)) - 1)],
        "max": lengths[-1],
        "truncated": sum(encoded.truncated),
    }


class _FixedBatches(Dataset[tuple[Tensor, Tensor]]):
    """Validation texts masked once, batched in order."""

    def __init__(self, rows: list[tuple[Tensor, Tensor]], batch_size: int) -> None:
        self.batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        batch = self.batches[index]
        width = max(inputs.shape[-1] for inputs, _ in batch)
        inputs = torch.cat(
            [nn.functional.pad(row, (0, width - row.shape[-1]), value=0) for row, _ in batch]
        )
        # Padding got label 0, not IGNORED: mark it ignored again (the mask row is 0 there).
        inputs[:, 2][inputs[:, 1] == 0] = IGNORED
        return inputs, torch.cat([targets for _, targets in batch])
