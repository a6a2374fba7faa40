"""PyTorch serving of a text model (a version without a passing `model.onnx`, or with old
tasks' heads): the batcher's padded ids and attention mask through the module."""

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor


def torch_forward(
    module: Any, device: torch.device
) -> tuple[Callable[[Any], tuple[Tensor, list[Tensor]]], Any]:
    """A batch → the module's (features, per-task logits); the module as it serves."""

    def forward(batch: tuple[np.ndarray, np.ndarray]) -> tuple[Tensor, list[Tensor]]:
        inputs = torch.stack([torch.from_numpy(array) for array in batch], dim=1)
        with torch.inference_mode():
            return module.forward_with_features(inputs.to(device))

    return forward, module
