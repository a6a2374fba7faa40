"""Images as training input: files read and preprocessed at the stage's size by worker
processes, balanced or augmented when the plan asks (the image side of `base.Inputs`)."""

import hashlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ...imbalance import training_sampler
from ...plan import Plan, Stage
from ...recipe import stage_augment
from ...zoo import Backbone
from .augment import SEED_BOUND, AugmentedImages, MixingCollate, augmented_batches
from .data import ImageDataset, Sample
from .preprocessing import ImagePreprocessing


class _WithRecording(Dataset[tuple[Tensor, tuple[int, Tensor]]]):
    """Each training image with its label and the parent's outputs on it."""

    def __init__(self, images: ImageDataset, recorded: Tensor) -> None:
        self.images = images
        self.recorded = recorded

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, tuple[int, Tensor]]:
        image, label = self.images[index]
        return image, (label, self.recorded[index])


class ImageInputs:
    """Images from their files, preprocessed at the stage's size, loaded by worker processes."""

    def __init__(
        self, plan: Plan, *, device: torch.device, shuffle: torch.Generator, num_workers: int
    ) -> None:
        self.plan = plan
        self.device = device
        self.shuffle = shuffle
        self.num_workers = num_workers

    def batches(
        self,
        samples: Sequence[Sample],
        stage: Stage,
        *,
        shuffled: bool,
        recorded: Tensor | None = None,
    ) -> DataLoader[Any]:
        assert stage.image_size is not None
        pixels = ImagePreprocessing.of(self.plan)
        images = ImageDataset(
            samples, image_size=stage.image_size, mean=pixels.mean, std=pixels.std
        )
        dataset: Dataset[Any] = images if recorded is None else _WithRecording(images, recorded)
        loader: dict[str, Any] = {
            "num_workers": self.num_workers,
            "pin_memory": self.device.type == "cuda",
            "persistent_workers": self.num_workers > 0,
        }
        # Only training batches are shuffled, so only they are drawn balanced or augmented.
        labels = [sample.label for sample in samples]
        sampler = training_sampler(self.plan, labels, self.shuffle) if shuffled else None
        if shuffled and stage_augment(self.plan, stage) != "none":
            return augmented_batches(
                samples, self.plan, stage.image_size, self.shuffle, sampler, **loader
            )
        return DataLoader(
            dataset,
            batch_size=self.plan.batch_size,
            shuffle=shuffled and sampler is None,
            sampler=sampler,
            generator=self.shuffle if shuffled else None,
            **loader,
        )

    def steps(self, samples: Sequence[Any], stage: Stage) -> int:
        return math.ceil(len(samples) / self.plan.batch_size)

    def view_batches(self, samples: Sequence[Sample], stage: Stage, view: int) -> DataLoader[Any]:
        """Unshuffled batches of the training images as augmented in view `view`."""
        assert stage.image_size is not None
        return DataLoader(
            AugmentedImages(samples, self.plan, stage.image_size),
            batch_size=self.plan.batch_size,
            sampler=_FixedKeys(len(samples), view),
            collate_fn=MixingCollate(None),
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )

    def describe(self) -> dict[str, Any]:
        return {}

    def language_model(
        self, backbone: Backbone, lm_head: nn.Module, train: Sequence[Any], val: Sequence[Any]
    ) -> tuple[nn.Module, DataLoader[Any], DataLoader[Any]]:
        raise ValueError("a masked-LM stage needs a text base model")


def view_seed(view: int, position: int) -> int:
    """The augmentation seed of the `position`-th training item in view `view`."""
    digest = hashlib.sha256(f"thaw-view\0{view}\0{position}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % SEED_BOUND


class _FixedKeys(Sampler[tuple[int, int]]):
    """Every item once, in order, each with its view's augmentation seed."""

    def __init__(self, count: int, view: int) -> None:
        self.keys = [(position, view_seed(view, position)) for position in range(count)]

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.keys)
