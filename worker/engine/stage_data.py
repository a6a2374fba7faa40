"""Per stage, what trains on which batches: the modality's inputs, or features computed once.

`run` asks this twice: `record_old_outputs()` once before any training, and `for_stage(stage)`
when a stage starts, which answers with a `StageBatches`. Which inputs (images, texts) the
batches hold is the modality's business (`modalities.Inputs`); the feature cache, LwF's
recorded outputs and the choice of module are the same for every modality.

Backbone features are computed once per run and input size (and view), and with a
`SharedFeatures` once across runs: looked up in the store first, computed and stored only when
absent (`features.py`). LwF's recorded outputs are the parent's old heads applied to the same
features as its head-only warm-up trains on, so the two share one backbone pass.
"""

import logging
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    TensorDataset,
)

from .features import (
    SharedFeatures,
    ViewFeatures,
    ViewSampler,
    cached_views,
    feature_key,
    weights_digest,
)
from .imbalance import training_sampler
from .loop import Batches, Precision, in_sample_order
from .modalities import modality_for
from .modalities.base import Inputs
from .model import TransferModel
from .plan import MASKED_LM, Plan, Stage
from .strategies.lwf.distillation import AllTasks

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageBatches:
    """What a stage trains and evaluates, and the batches of each."""

    trained: nn.Module
    """The head alone, the whole model, (LwF) the model answering every task, or (ulmfit's
    LM stage) the encoder with its masked-LM head."""
    evaluated: nn.Module
    """What answers the stage's objective on `val`'s inputs."""
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
    """Pooled backbone features and labels of every sample, in sample order."""
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
    return in_sample_order(torch.cat(features), batches), in_sample_order(
        torch.cat(labels), batches
    )


def _input_key(stage: Stage) -> Hashable:
    """What backbone features depend on besides the weights: the image size (None for text)."""
    return stage.image_size


class StageData:
    """Batches for a stage: the modality's inputs, or backbone features computed once."""

    def __init__(
        self,
        plan: Plan,
        model: TransferModel,
        train: Sequence[Any],
        val: Sequence[Any],
        *,
        inputs: Inputs,
        device: torch.device,
        precision: Precision,
        shuffle: torch.Generator,
        check_cancelled: Callable[[], None],
        shared: SharedFeatures | None = None,
    ) -> None:
        if shared is not None and (
            len(shared.train_ids) != len(train) or len(shared.val_ids) != len(val)
        ):
            raise ValueError("shared features need one id per training and validation sample")
        self.plan = plan
        self.model = model
        self.train = train
        self.val = val
        self.inputs = inputs
        self.device = device
        self.precision = precision
        self.shuffle = shuffle
        self.check_cancelled = check_cancelled
        self.shared = shared
        # Valid only while no stage has trained the backbone since they were computed.
        self.features: dict[tuple[str, Hashable, int | None], Tensor] = {}
        """Per split, input key and view (None: the plain items)."""
        self._weights: str | None = None
        """The backbone's weights digest, while the features above are valid."""
        self.recorded: dict[Hashable, Tensor] = {}
        """LwF: the parent's old-head logits on every training sample, per input key."""

    def _train_sampler(self) -> Sampler[int] | None:
        return training_sampler(self.plan, [sample.label for sample in self.train], self.shuffle)

    def record_old_outputs(self) -> None:
        """The untouched model's old heads on every training sample at every distilled size:
        applied to the backbone's features (read or computed as a cached stage's are)."""
        stages = {_input_key(stage): stage for stage in self.plan.stages if stage.distill}
        self.model.eval()
        for key, stage in stages.items():
            features = self._features("train", stage, view=None)
            with torch.no_grad(), self.precision.autocast():
                outputs = [
                    torch.cat([head(chunk) for head in self.model.old_heads], dim=1).float()
                    for chunk in features.split(self.plan.batch_size)
                ]
            self.recorded[key] = torch.cat(outputs).cpu()

    def for_stage(self, stage: Stage) -> StageBatches:
        if stage.cache_features:
            return self._cached_features(stage)
        # This stage trains the backbone, so features computed before it go stale.
        self.features.clear()
        self._weights = None
        if stage.objective == MASKED_LM:
            assert self.model.lm_head is not None
            trained, train, val_lm = self.inputs.language_model(
                self.model.backbone, self.model.lm_head, self.train, self.val
            )
            return StageBatches(trained, trained, train, val_lm)
        val = self.inputs.batches(self.val, stage, shuffled=False)
        if stage.distill:
            train = self.inputs.batches(
                self.train, stage, shuffled=True, recorded=self.recorded[_input_key(stage)]
            )
            return StageBatches(AllTasks(self.model), self.model, train, val)
        return StageBatches(
            self.model, self.model, self.inputs.batches(self.train, stage, shuffled=True), val
        )

    def _features(self, split: str, stage: Stage, view: int | None) -> Tensor:
        """The backbone's features of a split's items (`view`: augmented), in order."""
        memo = (split, _input_key(stage), view)
        if memo not in self.features:
            # Iterating a DataLoader draws a seed from the global stream: forked, computing
            # features draws nothing, so a store hit and a miss leave the same random state.
            with torch.random.fork_rng(devices=[]):
                self.features[memo] = self._load(split, stage, view)
        return self.features[memo]

    def _load(self, split: str, stage: Stage, view: int | None) -> Tensor:
        samples = self.train if split == "train" else self.val
        if self.shared is None:
            return self._compute(samples, stage, view)
        if self._weights is None:
            self._weights = weights_digest(self.model.backbone)
        key = feature_key(
            self.plan,
            stage,
            weights=self._weights,
            precision=self.precision,
            ids=self.shared.train_ids if split == "train" else self.shared.val_ids,
            view=view,
        )
        store = self.shared.store
        stored = _usable(store.get(key), len(samples))
        if stored is None:
            with store.filling(key):
                stored = _usable(store.get(key), len(samples))
                if stored is None:
                    features = self._compute(samples, stage, view)
                    store.put(key, features.cpu())
                    return features
        logger.info(
            "read %s features of %d items from the store", self.plan.base_model, len(stored)
        )
        return stored.to(self.device)

    def _compute(self, samples: Sequence[Any], stage: Stage, view: int | None) -> Tensor:
        started = time.perf_counter()
        if view is None:
            batches = self.inputs.batches(samples, stage, shuffled=False)
        else:
            batches = self.inputs.view_batches(samples, stage, view)
        features, _ = compute_features(
            self.model.backbone, batches, self.device, self.check_cancelled, self.precision
        )
        logger.info(
            "computed %s features of %d samples (%s%s) in %.1fs",
            self.plan.base_model,
            len(samples),
            ", ".join(
                f"{name} {value}"
                for name, value in modality_for(self.plan.modality)
                .stage_inputs(self.plan, stage)
                .items()
            ),
            "" if view is None else f", augmented view {view}",
            time.perf_counter() - started,
        )
        return features

    def head_features(self, stage: Stage) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """A stage on cached features as whole tensors, for a solved head: the training
        features (every augmented view of every item, when the stage has views) with their
        labels, and the validation features with theirs."""
        labels = torch.tensor([sample.label for sample in self.train], device=self.device)
        views = cached_views(self.plan, stage)
        assert views is not None
        train = torch.cat([self._features("train", stage, view) for view in _view_keys(views)])
        val_labels = torch.tensor([sample.label for sample in self.val], device=self.device)
        return train, labels.repeat(views), self._features("val", stage, None), val_labels

    def _cached_features(self, stage: Stage) -> StageBatches:
        """The head trains on backbone features: `stage.passes` shuffled passes over the
        training items each epoch (with `feature_views` augmented views of each item, a view
        drawn per item and pass, when the stage is augmented)."""
        batch_size = self.plan.batch_size
        head = self.model.head
        labels = torch.tensor([sample.label for sample in self.train], device=self.device)
        val_labels = torch.tensor([sample.label for sample in self.val], device=self.device)
        val = DataLoader(
            TensorDataset(self._features("val", stage, None), val_labels), batch_size=batch_size
        )
        order: Sampler[Any] = self._train_sampler() or RandomSampler(
            range(len(self.train)), generator=self.shuffle
        )
        views = cached_views(self.plan, stage)
        assert views is not None
        dataset: Dataset[Any]
        if views == 1:
            dataset = TensorDataset(self._features("train", stage, None), labels)
        else:
            dataset = ViewFeatures(
                [self._features("train", stage, view) for view in range(views)], labels
            )
            order = ViewSampler(order, views, self.shuffle)
        train = DataLoader(
            dataset,
            batch_sampler=Passes(order, batch_size, stage.passes),
            generator=self.shuffle,
        )
        return StageBatches(head, head, train, val)


class Passes(Sampler[list[Any]]):
    """One epoch's batches: `passes` passes, each batching a fresh iteration of `order`.

    Each pass draws its order (and, through a `ViewSampler`, its views) from the shuffle
    stream as it starts, as an epoch of one pass does, so a run resumed mid-epoch redraws the
    same batches by iterating from the epoch's start."""

    def __init__(self, order: Sampler[Any], batch_size: int, passes: int) -> None:
        self.batches = BatchSampler(order, batch_size, drop_last=False)
        self.passes = passes

    def __len__(self) -> int:
        return self.passes * len(self.batches)

    def __iter__(self) -> Iterator[list[Any]]:
        for _ in range(self.passes):
            yield from self.batches


def _view_keys(views: int) -> list[int | None]:
    """The feature keys of a stage's training views: the plain items, or each augmented view."""
    return [None] if views == 1 else list(range(views))


def _usable(stored: Tensor | None, count: int) -> Tensor | None:
    """A stored entry with one row per item; None otherwise (then it is computed again)."""
    if stored is None or stored.dim() != 2 or len(stored) != count:
        return None
    return stored
