"""Per stage, what trains on which batches: images, or backbone features computed once.

This is the only part of training that knows its inputs are images. `run` asks it twice:
`record_old_outputs()` once before any training, and `for_stage(stage)` when a stage
starts, which answers with a `StageBatches`.
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from .data import ImageDataset, Sample
from .imbalance import training_sampler
from .loop import Batches, Precision
from .lwf import AllTasks
from .model import TransferModel
from .plan import Plan, Stage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageBatches:
    """What a stage trains and evaluates, and the batches of each."""

    trained: nn.Module
    """The head alone, the whole model, or (LwF) the model answering every task."""
    evaluated: nn.Module
    """What answers the new task on `val`'s inputs."""
    train: DataLoader[Any]
    """Shuffled by the run's shuffle generator."""
    val: DataLoader[Any]


def compute_features(
    backbone: nn.Module,
    batches: Batches,
    device: torch.device,
    after_batch: Callable[[], None],
    precision: Precision | None = None,
) -> tuple[Tensor, Tensor]:
    """Pooled backbone features and labels for every batch, in order."""
    precision = precision or Precision(device.type)
    backbone.eval()
    features, labels = [], []
    with torch.no_grad(), precision.autocast():
        for inputs, targets in batches:
            assert isinstance(targets, Tensor)
            # Stored in fp32 so the head trains on them as on any fp32 input.
            features.append(backbone(precision.inputs(inputs, device)).float())
            labels.append(targets.to(device))
            after_batch()
    return torch.cat(features), torch.cat(labels)


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


class ImageStageData:
    """Batches for a stage: images, or backbone features computed once per image size."""

    def __init__(
        self,
        plan: Plan,
        model: TransferModel,
        train: list[Sample],
        val: list[Sample],
        *,
        device: torch.device,
        precision: Precision,
        shuffle: torch.Generator,
        num_workers: int,
        check_cancelled: Callable[[], None],
    ) -> None:
        self.plan = plan
        self.model = model
        self.train = train
        self.val = val
        self.device = device
        self.precision = precision
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.check_cancelled = check_cancelled
        # Valid only while no stage has trained the backbone since they were computed.
        self.features: dict[int, tuple[TensorDataset, TensorDataset]] = {}
        self.recorded: dict[int, Tensor] = {}
        """LwF: the parent's old-head logits on every training image, per image size."""

    def _train_sampler(self) -> Sampler[int] | None:
        return training_sampler(self.plan, [sample.label for sample in self.train], self.shuffle)

    def _loader(self, dataset: Dataset[Any], *, shuffled: bool) -> DataLoader[Any]:
        # Only the training samples are shuffled, so only they may be drawn balanced.
        sampler = self._train_sampler() if shuffled else None
        return DataLoader(
            dataset,
            batch_size=self.plan.batch_size,
            shuffle=shuffled and sampler is None,
            sampler=sampler,
            generator=self.shuffle if shuffled else None,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=self.num_workers > 0,
        )

    def _dataset(self, samples: list[Sample], image_size: int) -> ImageDataset:
        return ImageDataset(samples, image_size=image_size, mean=self.plan.mean, std=self.plan.std)

    def _images(self, samples: list[Sample], stage: Stage, *, shuffled: bool) -> DataLoader[Any]:
        return self._loader(self._dataset(samples, stage.image_size), shuffled=shuffled)

    def record_old_outputs(self) -> None:
        """Run the untouched model once over the training images at every distilled size."""
        sizes = sorted({stage.image_size for stage in self.plan.stages if stage.distill})
        self.model.eval()
        for size in sizes:
            outputs = []
            loader = self._loader(self._dataset(self.train, size), shuffled=False)
            with torch.no_grad(), self.precision.autocast():
                for inputs, _ in loader:
                    *old, _new = self.model.forward_tasks(
                        self.precision.inputs(inputs, self.device)
                    )
                    outputs.append(torch.cat(old, dim=1).float())
                    self.check_cancelled()
            self.recorded[size] = torch.cat(outputs).cpu()

    def for_stage(self, stage: Stage) -> StageBatches:
        if stage.cache_features:
            return self._cached_features(stage)
        # This stage trains the backbone, so features computed before it go stale.
        self.features.clear()
        val = self._images(self.val, stage, shuffled=False)
        if stage.distill:
            train = _WithRecording(
                self._dataset(self.train, stage.image_size), self.recorded[stage.image_size]
            )
            return StageBatches(
                AllTasks(self.model), self.model, self._loader(train, shuffled=True), val
            )
        return StageBatches(
            self.model, self.model, self._images(self.train, stage, shuffled=True), val
        )

    def _backbone_features(self, samples: list[Sample], stage: Stage) -> TensorDataset:
        batches = self._images(samples, stage, shuffled=False)
        features = compute_features(
            self.model.backbone, batches, self.device, self.check_cancelled, self.precision
        )
        return TensorDataset(*features)

    def _cached_features(self, stage: Stage) -> StageBatches:
        """The head trains on backbone features, computed on the stage's first use of a size."""
        if stage.image_size not in self.features:
            started = time.perf_counter()
            self.features[stage.image_size] = (
                self._backbone_features(self.train, stage),
                self._backbone_features(self.val, stage),
            )
            logger.info(
                "computed %s features of %d images at %dpx in %.1fs",
                self.plan.base_model,
                len(self.train) + len(self.val),
                stage.image_size,
                time.perf_counter() - started,
            )
        train_features, val_features = self.features[stage.image_size]
        batch_size = self.plan.batch_size
        head = self.model.head
        sampler = self._train_sampler()
        return StageBatches(
            head,
            head,
            DataLoader(
                train_features,
                batch_size=batch_size,
                shuffle=sampler is None,
                sampler=sampler,
                generator=self.shuffle,
            ),
            DataLoader(val_features, batch_size=batch_size),
        )
