"""Image loading and the one preprocessing function shared by training and inference."""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torch import Tensor
from torchvision.transforms.functional import normalize, to_tensor


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


def preprocess(
    image: Image.Image,
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> Tensor:
    """PIL image -> normalised (3, image_size, image_size) float tensor.

    The predictor calls this too, so a model sees at inference exactly what it saw in
    training. Squashing to a square keeps the whole image, which matters more for
    classification of user photos than keeping the aspect ratio.
    """
    # Phone photos store their rotation in EXIF; apply it so the model sees what users see.
    upright = ImageOps.exif_transpose(image)
    resized = upright.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
    return normalize(to_tensor(resized), list(mean), list(std))


class ImageDataset(torch.utils.data.Dataset[tuple[Tensor, int]]):
    def __init__(
        self,
        samples: Sequence[Sample],
        *,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.samples = samples
        self.image_size = image_size
        self.mean = mean
        self.std = std

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        sample = self.samples[index]
        with Image.open(sample.path) as image:
            tensor = preprocess(image, image_size=self.image_size, mean=self.mean, std=self.std)
        return tensor, sample.label
