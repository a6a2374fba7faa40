"""Training-time image augmentation, on `torchvision.transforms.v2`, reproducible on resume.

Levels (`augment` in the spec):
- `none`: the plain preprocessing (squash to the stage's size, normalise).
- `light`: random resized crop (scale 0.35-1, as timm's few-shot recipes use a milder crop than
  ImageNet's 0.08) and a horizontal flip.
- `standard`: light, then TrivialAugmentWide (Müller & Hutter 2021: one random operation at a
  random strength per image, no tuning).
- `strong`: standard, then random erasing on each image and MixUp or CutMix (one of them, per
  batch) on the batch, whose targets become class probabilities.
`flip: false` leaves the flip out (digits, text in images: a mirrored 3 is no 3).

Exact resume: every random choice comes from a seed drawn from the run's shuffle generator
together with the epoch's sample order (`SeededSampler`), and is made inside
`torch.random.fork_rng` seeded with it. A resumed run restores the generator to the epoch's
start, draws the same order and seeds, and so makes the same crops, flips and mixes, whichever
worker process loads the sample, and however many there are (the global random state, which
the checkpoint also keeps, differs per loader process).
"""

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, default_collate
from torchvision.transforms import v2

from ...plan import Plan
from .data import Sample
from .preprocessing import ImagePreprocessing

SEED_BOUND = 2**62
MIN_CROP_SCALE = 0.35
MIXUP_ALPHA = 0.2
CUTMIX_ALPHA = 1.0
ERASING_P = 0.25


def image_transform(plan: Plan, image_size: int) -> v2.Compose:
    """PIL image → normalised (3, size, size) tensor, with the plan's per-image augmentation."""
    steps: list[Any] = [
        v2.PILToTensor(),
        v2.RandomResizedCrop(image_size, scale=(MIN_CROP_SCALE, 1.0), antialias=True),
    ]
    if plan.flip:
        steps.append(v2.RandomHorizontalFlip())
    if plan.augment in ("standard", "strong"):
        steps.append(v2.TrivialAugmentWide())
    pixels = ImagePreprocessing.of(plan)
    steps += [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(pixels.mean), list(pixels.std)),
    ]
    if plan.augment == "strong":
        steps.append(v2.RandomErasing(p=ERASING_P))
    return v2.Compose(steps)


def batch_mix(plan: Plan) -> v2.RandomChoice | None:
    """`strong`: MixUp or CutMix on a training batch; None at other levels."""
    if plan.augment != "strong":
        return None
    return v2.RandomChoice(
        [
            v2.MixUp(alpha=MIXUP_ALPHA, num_classes=plan.num_classes),
            v2.CutMix(alpha=CUTMIX_ALPHA, num_classes=plan.num_classes),
        ]
    )


class SeededSampler(Sampler[tuple[int, int]]):
    """The base sampler's indices, each with a seed for its augmentation, both drawn from
    `generator` when an epoch's iteration starts."""

    def __init__(self, base: Sampler[int], generator: torch.Generator) -> None:
        self.base = base
        self.generator = generator

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = list(self.base)
        seeds = torch.randint(SEED_BOUND, (len(order),), generator=self.generator).tolist()
        return iter(zip(order, seeds, strict=True))


class AugmentedImages(Dataset[tuple[Tensor, int, int]]):
    """Training images, augmented with the seed the sampler gives each (index, seed) key."""

    def __init__(self, samples: Sequence[Sample], plan: Plan, image_size: int) -> None:
        self.samples = samples
        self.transform = image_transform(plan, image_size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int, int]:
        index, seed = key
        sample = self.samples[index]
        with Image.open(sample.path) as image:
            upright = ImageOps.exif_transpose(image).convert("RGB")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            tensor = self.transform(upright)
        return tensor, sample.label, seed


class MixingCollate:
    """Stacks a batch, then (`strong`) mixes it, seeded by its first sample's seed."""

    def __init__(self, mix: v2.RandomChoice | None) -> None:
        self.mix = mix

    def __call__(self, batch: list[tuple[Tensor, int, int]]) -> tuple[Tensor, Tensor]:
        images, labels = default_collate([(image, label) for image, label, _ in batch])
        if self.mix is None:
            return images, labels
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(batch[0][2])
            mixed, targets = self.mix(images, labels)
        return mixed, targets


def augmented_batches(
    samples: Sequence[Sample],
    plan: Plan,
    image_size: int,
    generator: torch.Generator,
    sampler: Sampler[int] | None,
    **loader: Any,
) -> DataLoader[Any]:
    """Training batches of augmented images, in the order `sampler` (else a shuffle) draws."""
    order = sampler or RandomSampler(range(len(samples)), generator=generator)
    return DataLoader(
        AugmentedImages(samples, plan, image_size),
        batch_size=plan.batch_size,
        sampler=SeededSampler(order, generator),
        collate_fn=MixingCollate(batch_mix(plan)),
        generator=generator,
        **loader,
    )
