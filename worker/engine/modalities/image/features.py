"""An image backbone's pretrained features of a dataset's images, pooled per layer group: what
transferability scores (`worker/engine/transferability.py`) before any training."""

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ...zoo import Backbone
from .data import ImageDataset, Sample


def pooled_features(
    backbone: Backbone,
    samples: Sequence[Sample],
    *,
    image_size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    batch_size: int,
    on_progress: Callable[[int, int], None] | None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The backbone's pooled features of these images, and each group's (transferability)."""
    images = ImageDataset(samples, image_size=image_size, mean=mean, std=std)
    loader = DataLoader(images, batch_size=batch_size, shuffle=False)
    return group_features(backbone, loader, on_progress=on_progress)


def group_features(
    backbone: Backbone,
    loader: DataLoader[tuple[Tensor, int]],
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The backbone's pooled output, and the output of each layer group pooled the same way
    (spatial or token mean), for every batch of `loader`, in eval mode and without gradients."""
    outputs: dict[str, list[Tensor]] = {}
    handles = []
    for name, modules in backbone.groups():
        last = modules[-1]
        if not list(last.children()) and not list(last.parameters(recurse=False)):
            continue
        outputs[name] = []
        handles.append(last.register_forward_hook(_pooling_hook(outputs[name])))
    pooled: list[Tensor] = []
    backbone.eval()
    try:
        with torch.inference_mode():
            for done, (batch, _) in enumerate(loader, start=1):
                pooled.append(backbone(batch))
                if on_progress is not None:
                    on_progress(done, len(loader))
    finally:
        for handle in handles:
            handle.remove()
    by_group = {name: torch.cat(parts).numpy() for name, parts in outputs.items() if parts}
    return torch.cat(pooled).numpy(), by_group


def _pooling_hook(sink: list[Tensor]) -> Callable[..., None]:
    def hook(_module: nn.Module, _inputs: object, output: object) -> None:
        if not isinstance(output, Tensor):
            return
        if output.dim() == 4:  # (B, C, H, W): a convolutional stage
            sink.append(output.mean(dim=(2, 3)))
        elif output.dim() == 3:  # (B, tokens, D): a transformer block
            sink.append(output.mean(dim=1))
        else:
            sink.append(output.flatten(1))

    return hook
