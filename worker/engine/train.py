"""Execute a Plan: stage by stage, epoch by epoch, evaluating on the validation set each epoch.

Stages whose backbone is entirely frozen train the head on backbone features computed once,
so their epochs cost a pass over the head only.
"""

import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, TensorDataset

from .data import ImageDataset, Sample
from .model import TransferModel, build_model, freeze, make_param_groups, set_batchnorm_mode
from .plan import Plan, Schedule, Stage, steps_per_epoch

logger = logging.getLogger(__name__)

Batches = Iterable[tuple[Tensor, Tensor]]


@dataclass
class EpochResult:
    stage: str
    stage_index: int
    epoch: int
    """1-based, within the stage."""
    global_epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    learning_rates: dict[str, float]
    """Per optimizer group, as set for the step after this epoch's last one."""
    seconds: float


class TrainingHooks:
    """Callbacks from `run`; subclass and override what you need."""

    def on_epoch_end(self, result: EpochResult) -> None:
        return None

    def should_stop(self) -> bool:
        """Polled between steps; returning True makes `run` raise TrainingCancelled."""
        return False

    def on_progress(self, done_steps: int, total_steps: int) -> None:
        return None


class TrainingCancelled(Exception):  # noqa: N818 - public name other code catches
    """`TrainingHooks.should_stop` asked the run to end."""


@dataclass
class TrainingResult:
    model: TransferModel
    history: list[EpochResult]
    metrics: dict[str, Any]


@dataclass(frozen=True)
class Evaluation:
    loss: float
    """Plain cross-entropy, without label smoothing, so runs stay comparable."""
    accuracy: float
    predictions: Tensor


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(plan: Plan, param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    if plan.optimizer == "sgd":
        return torch.optim.SGD(param_groups, momentum=0.9, weight_decay=plan.weight_decay)
    return torch.optim.AdamW(param_groups, weight_decay=plan.weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: Schedule, total_steps: int
) -> LambdaLR:
    """Per-step multiplier on every group's rate: 1, or a cosine from 1 down to 0."""

    def factor(step: int) -> float:
        if schedule == "constant":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))

    return LambdaLR(optimizer, factor)


def train_one_epoch(
    module: nn.Module,
    batches: Batches,
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    loss_fn: nn.Module,
    device: torch.device,
    after_step: Callable[[], None],
) -> float:
    """One pass over `batches`; returns the mean training loss."""
    module.train()
    total_loss, count = 0.0, 0
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        loss = loss_fn(module(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total_loss += loss.item() * len(targets)
        count += len(targets)
        after_step()
    return total_loss / count


def evaluate(module: nn.Module, batches: Batches, device: torch.device) -> Evaluation:
    module.eval()
    total_loss, correct, count = 0.0, 0, 0
    predictions = []
    with torch.no_grad():
        for inputs, targets in batches:
            inputs, targets = inputs.to(device), targets.to(device)
            logits = module(inputs)
            total_loss += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            predicted = logits.argmax(dim=1)
            correct += int((predicted == targets).sum().item())
            count += len(targets)
            predictions.append(predicted.cpu())
    return Evaluation(total_loss / count, correct / count, torch.cat(predictions))


def compute_features(
    backbone: nn.Module, batches: Batches, device: torch.device, after_batch: Callable[[], None]
) -> tuple[Tensor, Tensor]:
    """Pooled backbone features and labels for every batch, in order."""
    backbone.eval()
    features, labels = [], []
    with torch.no_grad():
        for inputs, targets in batches:
            features.append(backbone(inputs.to(device)))
            labels.append(targets.to(device))
            after_batch()
    return torch.cat(features), torch.cat(labels)


def classification_metrics(
    targets: Tensor, predictions: Tensor, classes: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1/support and the confusion matrix (rows: true)."""
    size = len(classes)
    confusion = torch.zeros(size, size, dtype=torch.int64)
    confusion.index_put_((targets, predictions), torch.ones_like(targets), accumulate=True)
    per_class = []
    for index, label in enumerate(classes):
        hits = int(confusion[index, index])
        predicted = int(confusion[:, index].sum())
        support = int(confusion[index].sum())
        precision = hits / predicted if predicted else 0.0
        recall = hits / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.append(
            {
                "label": label,
                "precision": precision,
                "recall": recall,
                "f1": f1,
                "support": support,
            }
        )
    return {
        "val_accuracy": int(confusion.diagonal().sum()) / len(targets),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
        "classes": list(classes),
    }


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write via a temporary file so a crash never leaves a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    torch.save(state, partial)
    os.replace(partial, path)


def _rng_state(shuffle: torch.Generator) -> dict[str, Any]:
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        # Stored as plain lists so the checkpoint loads with weights_only=True.
        "numpy": {
            "key": numpy_state["state"]["key"].tolist(),
            "pos": int(numpy_state["state"]["pos"]),
        },
        "torch": torch.get_rng_state(),
        "shuffle": shuffle.get_state(),
    }


class _Progress:
    def __init__(self, hooks: TrainingHooks, total_steps: int) -> None:
        self.hooks = hooks
        self.total_steps = total_steps
        self.done_steps = 0

    def check_cancelled(self) -> None:
        if self.hooks.should_stop():
            raise TrainingCancelled(f"cancelled after {self.done_steps} steps")

    def step(self) -> None:
        self.done_steps += 1
        self.hooks.on_progress(self.done_steps, self.total_steps)
        self.check_cancelled()


class _EarlyStopping:
    """Tracks the epoch with the lowest val loss and, with a patience, its weights."""

    def __init__(self, patience: int | None) -> None:
        self.patience = patience
        self.best_loss = math.inf
        self.best_state: dict[str, Tensor] | None = None
        self.kept: Evaluation | None = None
        """The evaluation of the weights the run will return."""
        self.epochs_without_improvement = 0

    def start_stage(self) -> None:
        # A new stage changes what trains, so it gets its own full patience.
        self.epochs_without_improvement = 0

    def update(self, model: nn.Module, evaluation: Evaluation) -> bool:
        """Record an epoch's evaluation; True when the stage should stop."""
        if self.patience is None:
            self.kept = evaluation
            return False
        if evaluation.loss < self.best_loss:
            self.best_loss = evaluation.loss
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.kept = evaluation
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1
        return self.epochs_without_improvement >= self.patience

    def restore_best(self, model: nn.Module) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)


class _StageData:
    """Batches for a stage: images, or backbone features computed once per image size."""

    def __init__(
        self,
        plan: Plan,
        model: TransferModel,
        train: list[Sample],
        val: list[Sample],
        *,
        device: torch.device,
        shuffle: torch.Generator,
        num_workers: int,
        check_cancelled: Callable[[], None],
    ) -> None:
        self.plan = plan
        self.model = model
        self.train = train
        self.val = val
        self.device = device
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.check_cancelled = check_cancelled
        # Valid only while no stage has trained the backbone since they were computed.
        self.features: dict[int, tuple[TensorDataset, TensorDataset]] = {}

    def images(self, samples: list[Sample], stage: Stage, *, shuffled: bool) -> DataLoader[Any]:
        dataset = ImageDataset(
            samples, image_size=stage.image_size, mean=self.plan.mean, std=self.plan.std
        )
        return DataLoader(
            dataset,
            batch_size=self.plan.batch_size,
            shuffle=shuffled,
            generator=self.shuffle if shuffled else None,
            num_workers=self.num_workers,
        )

    def _backbone_features(self, samples: list[Sample], stage: Stage) -> TensorDataset:
        batches = self.images(samples, stage, shuffled=False)
        features = compute_features(self.model.backbone, batches, self.device, self.check_cancelled)
        return TensorDataset(*features)

    def for_stage(self, stage: Stage) -> tuple[nn.Module, DataLoader[Any], DataLoader[Any]]:
        """The module to train (head or whole model) with its train and val batches."""
        if not stage.cache_features:
            self.features.clear()
            return (
                self.model,
                self.images(self.train, stage, shuffled=True),
                self.images(self.val, stage, shuffled=False),
            )
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
        return (
            self.model.head,
            DataLoader(train_features, batch_size=batch_size, shuffle=True, generator=self.shuffle),
            DataLoader(val_features, batch_size=batch_size),
        )


def _check_inputs(plan: Plan, train: list[Sample], val: list[Sample], classes: list[str]) -> None:
    if len(classes) != plan.num_classes:
        raise ValueError(f"{len(classes)} class names for a {plan.num_classes}-class plan")
    if not train or not val:
        raise ValueError("training needs at least one training and one validation image")
    labels = {sample.label for sample in [*train, *val]}
    if not labels <= set(range(plan.num_classes)):
        raise ValueError(f"labels outside 0..{plan.num_classes - 1}: {sorted(labels)}")


def run(
    plan: Plan,
    *,
    train: list[Sample],
    val: list[Sample],
    classes: list[str],
    hooks: TrainingHooks | None = None,
    weights_dir: Path | None = None,
    checkpoint_path: Path | None = None,
    num_workers: int = 0,
) -> TrainingResult:
    """Train a model by `plan` and evaluate it on `val` after every epoch.

    Deterministic for a given seed, device and thread count. With early stopping, a stage
    ends once its val loss has not improved on the best so far for `patience` epochs, and
    the best weights are restored before the next stage and at the end. The final metrics
    are those of the returned model: the best epoch's with early stopping, else the last's.
    A checkpoint, when asked for, is rewritten after every epoch.
    """
    _check_inputs(plan, train, val, classes)
    if hooks is None:
        hooks = TrainingHooks()
    seed_everything(plan.seed)
    shuffle = torch.Generator().manual_seed(plan.seed)
    device = torch.device(plan.device)
    model = build_model(plan, weights_dir=weights_dir).to(device)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=plan.label_smoothing)
    total_epochs = sum(stage.epochs for stage in plan.stages)
    progress = _Progress(hooks, total_epochs * steps_per_epoch(plan, len(train)))

    data = _StageData(
        plan,
        model,
        train,
        val,
        device=device,
        shuffle=shuffle,
        num_workers=num_workers,
        check_cancelled=progress.check_cancelled,
    )
    stopping = _EarlyStopping(plan.early_stopping_patience)
    history: list[EpochResult] = []
    for stage_index, stage in enumerate(plan.stages):
        freeze(model, stage.trainable_groups)
        set_batchnorm_mode(model, stage)
        optimizer = make_optimizer(plan, make_param_groups(model, stage))
        module, train_batches, val_batches = data.for_stage(stage)
        scheduler = make_scheduler(optimizer, stage.schedule, stage.epochs * len(train_batches))
        stopping.start_stage()
        for epoch in range(1, stage.epochs + 1):
            progress.check_cancelled()
            started = time.perf_counter()
            train_loss = train_one_epoch(
                module, train_batches, optimizer, scheduler, loss_fn, device, progress.step
            )
            evaluation = evaluate(module, val_batches, device)
            result = EpochResult(
                stage=stage.name,
                stage_index=stage_index,
                epoch=epoch,
                global_epoch=len(history) + 1,
                train_loss=train_loss,
                val_loss=evaluation.loss,
                val_accuracy=evaluation.accuracy,
                learning_rates={group["name"]: group["lr"] for group in optimizer.param_groups},
                seconds=time.perf_counter() - started,
            )
            history.append(result)
            logger.info(
                "stage %s epoch %d/%d: train loss %.4f, val loss %.4f, val accuracy %.4f (%.1fs)",
                stage.name,
                epoch,
                stage.epochs,
                train_loss,
                evaluation.loss,
                evaluation.accuracy,
                result.seconds,
            )
            if checkpoint_path is not None:
                save_checkpoint(
                    checkpoint_path,
                    {
                        "plan": plan.to_dict(),
                        "stage_index": stage_index,
                        "epoch": epoch,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "history": [asdict(entry) for entry in history],
                        "rng": _rng_state(shuffle),
                    },
                )
            hooks.on_epoch_end(result)
            if stopping.update(model, evaluation):
                logger.info("stage %s: val loss stopped improving; ending the stage", stage.name)
                break
        # The next stage, and the returned model, start from the best weights seen so far.
        stopping.restore_best(model)
    assert stopping.kept is not None, "every plan has at least one epoch"
    model.eval()
    targets = torch.tensor([sample.label for sample in val])
    metrics = classification_metrics(targets, stopping.kept.predictions, classes)
    metrics["val_loss"] = stopping.kept.loss
    logger.info(
        "finished: val accuracy %.4f, val loss %.4f", metrics["val_accuracy"], metrics["val_loss"]
    )
    return TrainingResult(model=model, history=history, metrics=metrics)
