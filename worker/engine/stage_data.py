"""Per stage, what trains on which batches: the modality's inputs, or features computed once.

`run` asks this twice: `record_old_outputs()` once before any training, and `for_stage(stage)`
when a stage starts, which answers with a `StageBatches`. Which inputs (images, texts) the
batches hold is the modality's business (`modality.Inputs`); the feature cache, LwF's
recorded outputs and the choice of module are the same for every modality.
"""

import logging
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from .imbalance import training_sampler
from .loop import Batches, Precision
from .lwf import AllTasks
from .modality import Inputs
from .model import TransferModel
from .plan import MASKED_LM, Plan, Stage

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
    ) -> None:
        self.plan = plan
        self.model = model
        self.train = train
        self.val = val
        self.inputs = inputs
        self.device = device
        self.precision = precision
        self.shuffle = shuffle
        self.check_cancelled = check_cancelled
        # Valid only while no stage has trained the backbone since they were computed.
        self.features: dict[Hashable, tuple[TensorDataset, TensorDataset]] = {}
        self.recorded: dict[Hashable, Tensor] = {}
        """LwF: the parent's old-head logits on every training sample, per input key."""

    def _train_sampler(self) -> Sampler[int] | None:
        return training_sampler(self.plan, [sample.label for sample in self.train], self.shuffle)

    def record_old_outputs(self) -> None:
        """Run the untouched model once over the training samples at every distilled size."""
        stages = {_input_key(stage): stage for stage in self.plan.stages if stage.distill}
        self.model.eval()
        for key, stage in stages.items():
            outputs = []
            loader = self.inputs.batches(self.train, stage, shuffled=False)
            with torch.no_grad(), self.precision.autocast():
                for inputs, _ in loader:
                    *old, _new = self.model.forward_tasks(
                        self.precision.inputs(inputs, self.device)
                    )
                    outputs.append(torch.cat(old, dim=1).float())
                    self.check_cancelled()
            self.recorded[key] = torch.cat(outputs).cpu()

    def for_stage(self, stage: Stage) -> StageBatches:
        if stage.cache_features:
            return self._cached_features(stage)
        # This stage trains the backbone, so features computed before it go stale.
        self.features.clear()
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

    def _backbone_features(self, samples: Sequence[Any], stage: Stage) -> TensorDataset:
        batches = self.inputs.batches(samples, stage, shuffled=False)
        features = compute_features(
            self.model.backbone, batches, self.device, self.check_cancelled, self.precision
        )
        return TensorDataset(*features)

    def _cached_features(self, stage: Stage) -> StageBatches:
        """The head trains on backbone features, computed on the stage's first use of its
        input size."""
        key = _input_key(stage)
        if key not in self.features:
            started = time.perf_counter()
            self.features[key] = (
                self._backbone_features(self.train, stage),
                self._backbone_features(self.val, stage),
            )
            logger.info(
                "computed %s features of %d samples (%s) in %.1fs",
                self.plan.base_model,
                len(self.train) + len(self.val),
                f"{key}px" if key is not None else f"{self.plan.max_length} tokens",
                time.perf_counter() - started,
            )
        train_features, val_features = self.features[key]
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
