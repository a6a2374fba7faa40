"""Test-time augmentation measured at the final validation, as predict reads images.

The views are read by the model's `ServedImages` and averaged by `predictor.read_probabilities`,
as `Predictor.predict` does (and the ONNX Runtime path of predict builds the same views with
`pixels.view_pixels`): so predict answers what evaluation measured.
"""

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ...model import TransferModel
from ...plan import Plan
from ...predictor import ITEMS_PER_PASS, read_probabilities
from ...recipe import tta_views
from .exported import ExportedImagePreprocessing
from .pixels import read_image
from .preprocessing import ImagePreprocessing, final_image_size
from .serving import ServedImages

if TYPE_CHECKING:
    # Only a type here: importing `.data` imports torchvision (over a second), which a worker
    # answering text or scoring trials never needs.
    from .data import Sample


def evaluate_tta(
    model: TransferModel, samples: Sequence["Sample"], plan: Plan, device: torch.device
) -> tuple[dict[str, Any], Tensor]:
    """Validation accuracy of the plan's test-time augmentation, and its (raw) probabilities."""
    pixels = ImagePreprocessing.of(plan)
    preprocessing = ExportedImagePreprocessing(
        image_size=final_image_size(plan),
        mean=pixels.mean,
        std=pixels.std,
        tta=tta_views(plan.tta, flip=plan.flip),
    )
    served = ServedImages(preprocessing)
    model.eval()

    def forward(batch: np.ndarray) -> tuple[Tensor, list[Tensor]]:
        with torch.inference_mode():
            return model.forward_with_features(torch.from_numpy(batch).to(device))

    chunks = []
    for start in range(0, len(samples), ITEMS_PER_PASS):
        images = [read_image(sample.path) for sample in samples[start : start + ITEMS_PER_PASS]]
        chunks.append(read_probabilities(forward, served, images))
    probabilities = torch.cat(chunks)
    targets = torch.tensor([sample.label for sample in samples])
    accuracy = float((probabilities.argmax(dim=1) == targets).float().mean())
    summary = {"mode": plan.tta, "views": list(preprocessing.tta), "val_accuracy": accuracy}
    return summary, probabilities
