"""PyTorch serving of an image model (a version without a passing `model.onnx`, or with old
tasks' heads): the batcher's normalised pixels through the module, channels-last."""

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor


def torch_forward(
    module: Any, device: torch.device
) -> tuple[Callable[[Any], tuple[Tensor, list[Tensor]]], Any]:
    """A batch → the module's (features, per-task logits); the module as it serves."""
    # Channels-last ran faster than the default layout at batch 1 and 32 in every
    # bench/inference.py run (e.g. 248 against 188 images/s at batch 32, one thread);
    # torch.compile was faster still but took minutes to compile, too long for a load.
    module = module.to(memory_format=torch.channels_last)

    def forward(batch: np.ndarray) -> tuple[Tensor, list[Tensor]]:
        inputs = torch.from_numpy(batch).to(device)
        with torch.inference_mode():
            channels_last = inputs.contiguous(memory_format=torch.channels_last)
            return module.forward_with_features(channels_last)

    return forward, module
