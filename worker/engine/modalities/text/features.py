"""A text encoder's pretrained features of a dataset's texts, pooled per layer group: what
transferability scores (`worker/engine/transferability.py`) before any training."""

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .tokens import SpecialTokens, encode, pad, plain_backend
from .zoo import build_text_backbone, load_tokenizer


def group_features(
    base_model: str,
    texts: Sequence[str],
    *,
    weights_dir: Path | None,
    max_length: int,
    batch_size: int = 64,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A text encoder's pooled output (its features for a head), and the hidden states after
    each layer group (`embeddings`, `layer.<i>`) mean-pooled over the attention mask, as the
    encoder pools its output, so padding never enters a feature."""
    backbone = build_text_backbone(base_model, pretrained=True, weights_dir=weights_dir)
    names = [name for name, _ in backbone.groups()]
    tokenizer = load_tokenizer(base_model, weights_dir)
    special = SpecialTokens.of(tokenizer)
    encoded = encode(
        plain_backend(tokenizer.backend_tokenizer),
        texts,
        special,
        max_length=max_length,
        truncation="head",
    )
    pooled: list[Tensor] = []
    outputs: dict[str, list[Tensor]] = {name: [] for name in names}
    starts = range(0, len(texts), batch_size)
    backbone.eval()
    with torch.inference_mode():
        for done, start in enumerate(starts, start=1):
            ids, mask = pad(encoded.ids[start : start + batch_size], special.pad_id)
            ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
            # hidden_states: the embeddings' output, then each encoder layer's, in order.
            states = backbone.net(
                input_ids=ids_t, attention_mask=mask_t, output_hidden_states=True
            ).hidden_states
            weights = mask_t.unsqueeze(-1).to(states[0].dtype)
            means = [(h * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9) for h in states]
            for name, mean in zip(names, means, strict=True):
                outputs[name].append(mean)
            pooled.append(means[-1])  # the encoder's own pooling: its last layer's mean
            if on_progress is not None:
                on_progress(done, len(starts))
    by_group = {name: torch.cat(parts).numpy() for name, parts in outputs.items()}
    return torch.cat(pooled).numpy(), by_group
