"""The one interface between the shared training machinery and what a modality reads.

Plans, stages, the training loop, checkpoints and exact resume, early stopping, LwF and the
feature cache are written once and never see an image or a text. What differs per modality
sits behind `Inputs` (this module's image implementation, `text.TextInputs` for text):

- `batches(samples, stage, shuffled=..., recorded=None)`: a loader of `(inputs, targets)`
  batches of the samples as the stage reads them (an image size; a token length), where
  `inputs` is one tensor the backbone takes whole and `targets` the labels (with LwF's
  recorded outputs when given). Shuffled loaders draw only from the run's shuffle stream,
  which is what makes a resumed run redraw the same batches.
- `steps(samples, stage)`: optimizer steps of one pass over the samples (an epoch of a stage
  on cached features makes `stage.passes` passes).
- `describe()`: facts kept with the metrics (text: token-length statistics).
- `language_model(...)`: ulmfit's masked-LM stage (text only).

The rest of a modality is its zoo (`zoo.py` images, `text_zoo.py` encoders: groups, pooling,
weights), its export extras (`export.py`: tokenizer files; `onnx_export.py`: the graph's
inputs) and the predictor's input (`pixels.py`, `tokens.py`). `inputs_for` picks by the
plan's modality, which the base model decides. A third modality is one more `Inputs`, zoo
entries with `groups()` and a pooled `forward`, and its export and predict preprocessing.
"""

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .augment import augmented_batches, stage_augment
from .data import ImageDataset, Sample
from .imbalance import training_sampler
from .plan import Plan, Stage
from .token_cache import EntryCache
from .zoo import Backbone


class Inputs(Protocol):
    def batches(
        self,
        samples: Sequence[Any],
        stage: Stage,
        *,
        shuffled: bool,
        recorded: Tensor | None = None,
    ) -> DataLoader[Any]: ...

    def steps(self, samples: Sequence[Any], stage: Stage) -> int: ...

    def describe(self) -> dict[str, Any]:
        """Facts about the inputs worth keeping with the metrics (text: token lengths)."""
        ...

    def language_model(
        self, backbone: Backbone, lm_head: nn.Module, train: Sequence[Any], val: Sequence[Any]
    ) -> tuple[nn.Module, DataLoader[Any], DataLoader[Any]]: ...


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
        images = ImageDataset(
            samples, image_size=stage.image_size, mean=self.plan.mean, std=self.plan.std
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

    def describe(self) -> dict[str, Any]:
        return {}

    def language_model(
        self, backbone: Backbone, lm_head: nn.Module, train: Sequence[Any], val: Sequence[Any]
    ) -> tuple[nn.Module, DataLoader[Any], DataLoader[Any]]:
        raise ValueError("a masked-LM stage needs a text base model")


def inputs_for(
    plan: Plan,
    train: Sequence[Any],
    val: Sequence[Any],
    *,
    unlabelled: Sequence[str],
    weights_dir: Path | None,
    device: torch.device,
    shuffle: torch.Generator,
    num_workers: int,
    token_cache: EntryCache | None,
) -> Inputs:
    if plan.modality == "text":
        from .text import TextInputs

        return TextInputs(
            plan,
            train,
            val,
            unlabelled=unlabelled,
            weights_dir=weights_dir,
            shuffle=shuffle,
            token_cache=token_cache,
        )
    if unlabelled:
        raise ValueError("unlabelled texts are for text base models")
    return ImageInputs(plan, device=device, shuffle=shuffle, num_workers=num_workers)
