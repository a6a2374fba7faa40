"""Frozen-backbone features shared across runs: the store interface, its keys, and augmented views.

A stage whose backbone is frozen trains the head on backbone features (`stage_data`). Those
features are a function of the backbone's weights, the preprocessing, the items and (for an
augmented view) the view, so a run given a `SharedFeatures` looks them up in a `FeatureStore`
under a key made of exactly those, and computes and stores them only when absent. Another job
on the same dataset and backbone (an experiment's other trials, a retry, a resumed attempt, a
later job) then runs no backbone pass at all. The engine only knows the interface; the worker
implements it on the artifact store (`worker/feature_store.py`).

The key (`feature_key`) covers: the base model's name and a digest of the backbone weights
actually in the model when the features are computed (pretrained, a parent's, or a stage's
training: whatever they are), the preprocessing (image size, mean and std; text length and
truncation), the numeric precision (device type, autocast dtype, memory format, the batch
size features are computed in), the ordered
item ids, and for an augmented view its index, level and flip switch. Labels are not stored:
they come from the samples.

Augmented views: a cached stage with `augment` on images computes `feature_views` augmented
views of every training image once (one backbone pass per image and view), and each epoch
trains on one view per image drawn from the run's shuffle stream (`ViewSampler`). A view's
random crop, flip and so on are seeded by its index and the image's position (`view_seed`,
with the view's batches in `modalities/image/inputs.py`), never by the run's streams, so the
same view comes out whether it was computed or read from the store. Computing or reading
features draws nothing from any random stream either (`stage_data` runs it under `fork_rng`;
a DataLoader draws a seed each time it is iterated), so a run that hits the store ends with
exactly the weights of one that misses, and exact resume holds. MixUp/CutMix (`strong`) mixes
pixels of a batch and has no feature-level equivalent: cached stages get the per-image part of
the level only.
"""

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Sampler

from .loop import Precision
from .modalities import modality_for
from .plan import Plan, Stage
from .recipe import cached_view_count, stage_augment

FEATURES_FORMAT = 2
"""Bump when what a stored entry holds, or how features are computed, changes (2: text
features computed in length-sorted batches)."""


class FeatureStore(Protocol):
    """Backbone features by key, shared by runs; entries appear whole or not at all."""

    def get(self, key: str) -> Tensor | None:
        """The (items, feature_dim) float32 features stored under `key`, or None."""
        ...

    def put(self, key: str, features: Tensor) -> None:
        """Store `features` under `key`; a concurrent `put` of the same key leaves one whole
        entry (either writer's)."""
        ...

    def filling(self, key: str) -> AbstractContextManager[None]:
        """Held while this process computes `key`'s features, so that another process asking
        for the same key waits and then reads them instead of computing them too."""
        ...


@dataclass(frozen=True)
class SharedFeatures:
    """What `run` needs to share features: a store and the stable ids of its samples, in the
    order given (a dataset's item ids: features are keyed by them, not by file paths)."""

    store: FeatureStore
    train_ids: Sequence[str]
    val_ids: Sequence[str]


def cached_views(plan: Plan, stage: Stage) -> int | None:
    """The views of each training item `stage` trains on (`recipe.cached_view_count`)."""
    return cached_view_count(
        cache_features=stage.cache_features,
        augment=stage_augment(plan, stage),
        feature_views=plan.feature_views,
    )


def weights_digest(module: nn.Module) -> str:
    """A digest of every tensor in `module`'s state, names, dtypes and shapes included."""
    digest = hashlib.blake2b(digest_size=20)
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}\0{flat.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def items_digest(ids: Sequence[str]) -> str:
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{len(ids)}\0".encode())
    for item in ids:
        encoded = item.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


def feature_key(
    plan: Plan,
    stage: Stage,
    *,
    weights: str,
    precision: Precision,
    ids: Sequence[str],
    view: int | None,
) -> str:
    """The store key of the features of `ids` (`view` None: the plain items)."""
    preprocessing = modality_for(plan.modality).feature_preprocessing(plan, stage)
    parts = {
        "format": FEATURES_FORMAT,
        "base_model": plan.base_model,
        "weights": weights,
        "modality": plan.modality,
        "preprocessing": preprocessing,
        "precision": [precision.device_type, str(precision.dtype), precision.channels_last],
        # Kernels may round differently per batch size: a hit must equal what a miss computes.
        "batch_size": plan.batch_size,
        "items": items_digest(ids),
        "view": (
            None if view is None else {"index": view, "augment": plan.augment, "flip": plan.flip}
        ),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class ViewFeatures(Dataset[tuple[Tensor, Tensor]]):
    """Training features with several views per item, read by (item, view) keys."""

    def __init__(self, views: Sequence[Tensor], labels: Tensor) -> None:
        self.views = views
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, Tensor]:
        index, view = key
        return self.views[view][index], self.labels[index]


class ViewSampler(Sampler[tuple[int, int]]):
    """The base sampler's order, each item with a view drawn from `generator` as an epoch's
    iteration starts (so a resumed epoch draws the same views)."""

    def __init__(self, base: Sampler[int], views: int, generator: torch.Generator) -> None:
        self.base = base
        self.views = views
        self.generator = generator

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = list(self.base)
        chosen = torch.randint(self.views, (len(order),), generator=self.generator).tolist()
        return iter(zip(order, chosen, strict=True))
