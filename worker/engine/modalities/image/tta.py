"""Test-time augmentation with torch: the final validation's and the torch predictor's.

Both call `view_probabilities`, which builds each image's views with `pixels.view_pixels`
(the function the ONNX Runtime path of predict uses too), runs them through the model, and
averages each image's per-view probabilities. So predict answers what evaluation measured.
"""

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ...model import TransferModel
from ...plan import Plan
from ...recipe import tta_views
from .exported import ExportedImagePreprocessing
from .pixels import normalise, read_image, view_pixels
from .preprocessing import ImagePreprocessing, final_image_size

if TYPE_CHECKING:
    # Only a type here: importing `.data` imports torchvision (over a second), which a worker
    # answering text or scoring trials never needs.
    from .data import Sample

IMAGES_PER_PASS = 16


def view_probabilities(
    model: TransferModel,
    images: Sequence[Image.Image],
    preprocessing: ExportedImagePreprocessing,
    device: torch.device,
    *,
    task: int = -1,
    temperature: float = 1.0,
) -> Tensor:
    """(N, classes) on the CPU: per image, the mean over `preprocessing.tta`'s views of
    softmax(logits / temperature) of task `task` (the newest by default)."""
    views = preprocessing.tta
    model.eval()
    averaged = []
    for start in range(0, len(images), IMAGES_PER_PASS):
        chunk = images[start : start + IMAGES_PER_PASS]
        pixels = np.concatenate(
            [view_pixels(image, preprocessing.image_size, views) for image in chunk]
        )
        batch = torch.from_numpy(normalise(pixels, preprocessing)).to(device)
        with torch.inference_mode():
            logits = model.forward_tasks(batch)[task].float()
        probabilities = (logits / temperature).softmax(dim=1)
        averaged.append(probabilities.reshape(len(chunk), len(views), -1).mean(dim=1).cpu())
    return torch.cat(averaged)


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
    chunks = []
    for start in range(0, len(samples), IMAGES_PER_PASS):
        images = [read_image(sample.path) for sample in samples[start : start + IMAGES_PER_PASS]]
        chunks.append(view_probabilities(model, images, preprocessing, device))
    probabilities = torch.cat(chunks)
    targets = torch.tensor([sample.label for sample in samples])
    accuracy = float((probabilities.argmax(dim=1) == targets).float().mean())
    summary = {"mode": plan.tta, "views": list(preprocessing.tta), "val_accuracy": accuracy}
    return summary, probabilities
