"""Execute a Plan: stage by stage, epoch by epoch, evaluating on the validation set each epoch.

Stages whose backbone is entirely frozen train the head on backbone features computed once
per image size, so their epochs cost a pass over the head only. LwF stages also fit the old
heads to outputs the parent model gave on the new images, recorded once before training.
A checkpoint written after every epoch lets `run(..., resume_from=...)` continue a job with
exactly the weights an uninterrupted run would have reached. A run can also be paused after
any training step (`TrainingHooks.should_pause`, e.g. on SIGTERM): it then checkpoints its
position inside the epoch, and a run resumed from that continues at the next step instead of
redoing the epoch, again ending where the uninterrupted run would have.
"""

import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .data import ImageDataset, Sample
from .model import TransferModel, build_model, freeze, make_param_groups, set_batchnorm_mode
from .plan import Plan, Schedule, Stage, steps_per_epoch

logger = logging.getLogger(__name__)

Targets = Tensor | Sequence[Tensor]
Batches = Iterable[tuple[Tensor, Targets]]

ONE_CYCLE_PCT_START = 0.3
ONE_CYCLE_DIV_FACTOR = 25.0
ONE_CYCLE_FINAL_DIV_FACTOR = 1e4
STLR_CUT_FRAC = 0.1
STLR_RATIO = 32.0


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

    def should_pause(self) -> bool:
        """Polled after every training step, after `should_stop`, so keep it cheap.

        Returning True makes `run` checkpoint its position inside the epoch (when it has a
        `checkpoint_path`) and raise TrainingPaused; `run(..., resume_from=...)` continues
        from the next step.
        """
        return False

    def on_progress(self, done_steps: int, total_steps: int) -> None:
        return None

    def on_resume(self, completed_epochs: int, steps_into_epoch: int) -> None:
        """Called once, before training, by a run that continues from a checkpoint."""
        return None


class TrainingCancelled(Exception):  # noqa: N818 - public name other code catches
    """`TrainingHooks.should_stop` asked the run to end."""


class TrainingPaused(Exception):  # noqa: N818 - public name other code catches
    """`TrainingHooks.should_pause` asked the run to stop where it can be resumed."""


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


@dataclass(frozen=True)
class Precision:
    """How tensors are computed: fp32, or autocast to `dtype`, optionally channels-last."""

    device_type: str
    dtype: torch.dtype | None = None
    channels_last: bool = False

    def autocast(self) -> AbstractContextManager[Any]:
        return torch.autocast(
            self.device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None
        )

    def grad_scaler(self) -> torch.amp.GradScaler:
        # Only fp16 can underflow gradients; bf16 has fp32's range.
        return torch.amp.GradScaler(self.device_type, enabled=self.dtype == torch.float16)

    def inputs(self, tensor: Tensor, device: torch.device) -> Tensor:
        if self.channels_last and tensor.dim() == 4:
            return tensor.to(device, memory_format=torch.channels_last, non_blocking=True)
        return tensor.to(device, non_blocking=True)


def precision_for(plan: Plan, device: torch.device) -> Precision:
    if device.type == "cuda" and plan.amp:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return Precision("cuda", dtype, channels_last=True)
    if device.type == "cpu" and plan.amp_cpu:
        return Precision("cpu", torch.bfloat16)
    return Precision(device.type)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(plan: Plan, param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    # torch picks the multi-tensor ("foreach") kernels by default only on CUDA; on the CPU the
    # per-tensor loop costs several percent of a fine-tuning step, more so with many groups.
    if plan.optimizer == "sgd":
        return torch.optim.SGD(
            param_groups, momentum=0.9, weight_decay=plan.weight_decay, foreach=True
        )
    return torch.optim.AdamW(param_groups, weight_decay=plan.weight_decay, foreach=True)


def _annealed(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def schedule_factor(schedule: Schedule, step: int, total_steps: int) -> float:
    """The multiplier on every group's top rate at `step` (0-based) of `total_steps`."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return _annealed(1.0, 0.0, min(step, total_steps) / total_steps)
    if schedule == "one_cycle":
        # torch.optim.lr_scheduler.OneCycleLR's two cosine phases with its defaults.
        warm_end = ONE_CYCLE_PCT_START * total_steps - 1
        initial = 1.0 / ONE_CYCLE_DIV_FACTOR
        if step <= warm_end:
            return _annealed(initial, 1.0, step / warm_end)
        pct = (step - warm_end) / (total_steps - 1 - warm_end)
        return _annealed(1.0, initial / ONE_CYCLE_FINAL_DIV_FACTOR, pct)
    # Slanted triangular (Howard & Ruder 2018): a short linear warm-up, a long linear decay.
    cut = max(1, math.floor(total_steps * STLR_CUT_FRAC))
    if step < cut:
        progress = step / cut
    else:
        progress = max(0.0, 1 - (step - cut) / (cut * (1 / STLR_CUT_FRAC - 1)))
    return (1 + progress * (STLR_RATIO - 1)) / STLR_RATIO


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: Schedule, total_steps: int
) -> LambdaLR:
    """Per-step multiplier on every group's rate, restarted for each stage."""
    return LambdaLR(optimizer, lambda step: schedule_factor(schedule, step, total_steps))


def _to_device(targets: Targets, device: torch.device) -> Targets:
    if isinstance(targets, Tensor):
        return targets.to(device, non_blocking=True)
    return [tensor.to(device, non_blocking=True) for tensor in targets]


@dataclass
class EpochPosition:
    """How far training has gone through an epoch."""

    steps: int
    loss_sum: Tensor
    """The training loss summed over samples, kept on the training device."""
    samples: int

    @classmethod
    def start(cls, device: torch.device) -> "EpochPosition":
        return cls(0, torch.zeros((), device=device), 0)

    def mean_loss(self) -> float:
        return float(self.loss_sum) / self.samples


def train_one_epoch(
    module: nn.Module,
    batches: Batches,
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    loss_fn: nn.Module,
    device: torch.device,
    after_step: Callable[[], None],
    *,
    precision: Precision | None = None,
    scaler: torch.amp.GradScaler | None = None,
    position: EpochPosition | None = None,
) -> float:
    """A pass over `batches`; returns the mean training loss of the epoch.

    `position`, when given, holds the steps of the epoch already done (the losses of those
    count towards the mean) and is advanced before every `after_step`, so it stays accurate
    when `after_step` raises. The loss is summed on the device and read once at the end:
    reading it every step would wait for the accelerator to finish each step before queueing
    the next.
    """
    precision = precision or Precision(device.type)
    scaler = scaler or precision.grad_scaler()
    position = position or EpochPosition.start(device)
    module.train()
    for inputs, targets in batches:
        inputs = precision.inputs(inputs, device)
        with precision.autocast():
            loss = loss_fn(module(inputs), _to_device(targets, device))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        position.loss_sum += loss.detach().float() * len(inputs)
        position.samples += len(inputs)
        position.steps += 1
        after_step()
    return position.mean_loss()


def evaluate(
    module: nn.Module, batches: Batches, device: torch.device, precision: Precision | None = None
) -> Evaluation:
    precision = precision or Precision(device.type)
    module.eval()
    total_loss = torch.zeros((), device=device)
    predictions = []
    targets_seen = []
    with torch.no_grad(), precision.autocast():
        for inputs, targets in batches:
            assert isinstance(targets, Tensor)
            logits = module(precision.inputs(inputs, device)).float()
            labels = targets.to(device)
            total_loss += nn.functional.cross_entropy(logits, labels, reduction="sum")
            predictions.append(logits.argmax(dim=1))
            targets_seen.append(labels)
    predicted = torch.cat(predictions)
    correct = int((predicted == torch.cat(targets_seen)).sum())
    count = len(predicted)
    return Evaluation(float(total_loss) / count, correct / count, predicted.cpu())


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


def soft_cross_entropy(logits: Tensor, reference: Tensor, temperature: float) -> Tensor:
    """Li & Hoiem's distillation loss: cross-entropy between temperature-softened outputs."""
    target = (reference / temperature).softmax(dim=1)
    return -(target * (logits / temperature).log_softmax(dim=1)).sum(dim=1).mean()


class LwFLoss(nn.Module):
    """New-task cross-entropy + lambda * distillation of each old head towards its recording.

    Called with every head's logits (oldest first, new last) and targets
    (labels, recorded old logits concatenated along classes).
    """

    def __init__(
        self, label_smoothing: float, old_sizes: list[int], temperature: float, weight: float
    ) -> None:
        super().__init__()
        self.cross_entropy = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.old_sizes = old_sizes
        self.temperature = temperature
        self.weight = weight

    def forward(self, outputs: list[Tensor], targets: Sequence[Tensor]) -> Tensor:
        labels, recorded = targets
        *old, new = outputs
        loss: Tensor = self.cross_entropy(new.float(), labels)
        for logits, reference in zip(old, recorded.split(self.old_sizes, dim=1), strict=True):
            loss = loss + self.weight * soft_cross_entropy(
                logits.float(), reference, self.temperature
            )
        return loss


class _AllTasks(nn.Module):
    """Trains an LwF model: forward answers every task, oldest first."""

    def __init__(self, model: TransferModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.model.forward_tasks(x)


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
    state = {
        "python": random.getstate(),
        # Stored as plain lists so the checkpoint loads with weights_only=True.
        "numpy": {
            "key": numpy_state["state"]["key"].tolist(),
            "pos": int(numpy_state["state"]["pos"]),
        },
        "torch": torch.get_rng_state(),
        "shuffle": shuffle.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any], shuffle: torch.Generator) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {
                "key": np.array(state["numpy"]["key"], dtype=np.uint32),
                "pos": state["numpy"]["pos"],
            },
        }
    )
    torch.set_rng_state(state["torch"])
    shuffle.set_state(state["shuffle"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
        if self.hooks.should_pause():
            raise TrainingPaused(f"paused after {self.done_steps} steps")


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

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_loss": self.best_loss,
            "best_state": self.best_state,
            # None while paused in the first epoch, before any evaluation.
            "kept": asdict(self.kept) if self.kept is not None else None,
            "epochs_without_improvement": self.epochs_without_improvement,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_loss = state["best_loss"]
        self.best_state = state["best_state"]
        self.kept = Evaluation(**state["kept"]) if state["kept"] is not None else None
        self.epochs_without_improvement = state["epochs_without_improvement"]


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

    def _loader(self, dataset: Dataset[Any], *, shuffled: bool) -> DataLoader[Any]:
        return DataLoader(
            dataset,
            batch_size=self.plan.batch_size,
            shuffle=shuffled,
            generator=self.shuffle if shuffled else None,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=self.num_workers > 0,
        )

    def _dataset(self, samples: list[Sample], image_size: int) -> ImageDataset:
        return ImageDataset(samples, image_size=image_size, mean=self.plan.mean, std=self.plan.std)

    def images(self, samples: list[Sample], stage: Stage, *, shuffled: bool) -> DataLoader[Any]:
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

    def _backbone_features(self, samples: list[Sample], stage: Stage) -> TensorDataset:
        batches = self.images(samples, stage, shuffled=False)
        features = compute_features(
            self.model.backbone, batches, self.device, self.check_cancelled, self.precision
        )
        return TensorDataset(*features)

    def for_stage(self, stage: Stage) -> tuple[nn.Module, DataLoader[Any], DataLoader[Any]]:
        """The module to train (head, whole model, or every task's output) with its batches."""
        if not stage.cache_features:
            self.features.clear()
            val = self.images(self.val, stage, shuffled=False)
            if stage.distill:
                train = _WithRecording(
                    self._dataset(self.train, stage.image_size), self.recorded[stage.image_size]
                )
                return _AllTasks(self.model), self._loader(train, shuffled=True), val
            return self.model, self.images(self.train, stage, shuffled=True), val
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


def _param_group_layout(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [
        {"name": group["name"], "parameters": [tuple(p.shape) for p in group["params"]]}
        for group in optimizer.param_groups
    ]


def _checkpoint(
    *,
    plan: Plan,
    model: TransferModel,
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    scaler: torch.amp.GradScaler,
    history: list[EpochResult],
    stopping: _EarlyStopping,
    shuffle: torch.Generator,
    stage_index: int,
    epoch: int,
    stage_done: bool,
) -> dict[str, Any]:
    """What `run` needs to continue after the last completed `epoch` of the stage."""
    return {
        "plan": plan.to_dict(),
        "stage_index": stage_index,
        "epoch": epoch,
        "stage_done": stage_done,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "param_groups": _param_group_layout(optimizer),
        "history": [asdict(entry) for entry in history],
        "early_stopping": stopping.state_dict(),
        "rng": _rng_state(shuffle),
    }


def _continue_epoch(
    batches: DataLoader[Any],
    checkpoint: dict[str, Any],
    shuffle: torch.Generator,
    device: torch.device,
) -> tuple[Iterator[Any], EpochPosition]:
    """The batches a paused epoch had left, in the same order, and its position at the pause."""
    partial = checkpoint["partial"]
    # The iterator draws the epoch's batch order from the shuffle stream, so it is drawn again
    # from where the epoch began; the batches done before the pause are passed over (their
    # images still load, but nothing trains) and the streams then set to where the pause left
    # them, which includes the dropout draws of those steps.
    _restore_rng(partial["epoch_start_rng"], shuffle)
    remaining = iter(batches)
    for _ in range(partial["steps"]):
        next(remaining)
    _restore_rng(checkpoint["rng"], shuffle)
    loss_sum = torch.tensor(partial["loss_sum"], device=device)
    return remaining, EpochPosition(partial["steps"], loss_sum, partial["samples"])


def load_checkpoint(path: Path, plan: Plan) -> dict[str, Any]:
    """A checkpoint `run` wrote for this same plan; raises ValueError for another plan's."""
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    if Plan.from_dict(state["plan"]) != plan:
        raise ValueError(f"{path} was written for a different plan")
    return state


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
    resume_from: Path | None = None,
) -> TrainingResult:
    """Train a model by `plan` and evaluate it on `val` after every epoch.

    Deterministic for a given seed, device and thread count. With early stopping, a stage
    ends once its val loss has not improved on the best so far for `patience` epochs, and
    the best weights are restored before the next stage and at the end. The final metrics
    are those of the returned model: the best epoch's with early stopping, else the last's.
    A checkpoint, when asked for, is rewritten after every epoch; `resume_from` continues
    from one (same plan, data and device) and ends with the weights the uninterrupted run
    would have had.

    After every training step `hooks.should_pause` is polled (after `should_stop`); when it
    returns True the checkpoint is rewritten with the position inside the current epoch
    (steps done, their summed loss, and the random state at the epoch's start and now) and
    TrainingPaused is raised. Resuming from such a checkpoint re-creates the epoch's batch
    order, skips the batches already trained on and trains the rest, so the epoch's history
    entry and the final weights are again those of the uninterrupted run. A resumed run
    reports where it continues from through `hooks.on_resume`.
    """
    _check_inputs(plan, train, val, classes)
    if hooks is None:
        hooks = TrainingHooks()
    seed_everything(plan.seed)
    shuffle = torch.Generator().manual_seed(plan.seed)
    device = torch.device(plan.device)
    precision = precision_for(plan, device)
    model = build_model(plan, weights_dir=weights_dir).to(device)
    if precision.channels_last:
        model.to(memory_format=torch.channels_last)
    total_epochs = sum(stage.epochs for stage in plan.stages)
    steps = steps_per_epoch(plan, len(train))
    progress = _Progress(hooks, total_epochs * steps)
    data = _StageData(
        plan,
        model,
        train,
        val,
        device=device,
        precision=precision,
        shuffle=shuffle,
        num_workers=num_workers,
        check_cancelled=progress.check_cancelled,
    )
    # Before any training, so the recording is of the parent as it was (also on resume).
    data.record_old_outputs()
    plain_loss = nn.CrossEntropyLoss(label_smoothing=plan.label_smoothing)
    lwf_loss = LwFLoss(
        plan.label_smoothing,
        [len(task.labels) for task in plan.old_tasks],
        plan.lwf_temperature,
        plan.lwf_lambda,
    )
    stopping = _EarlyStopping(plan.early_stopping_patience)
    history: list[EpochResult] = []
    start_stage, start_epoch = 0, 1
    resumed = load_checkpoint(resume_from, plan) if resume_from is not None else None
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        history = [EpochResult(**entry) for entry in resumed["history"]]
        stopping.load_state_dict(resumed["early_stopping"])
        steps_into_epoch = resumed["partial"]["steps"] if "partial" in resumed else 0
        progress.done_steps = len(history) * steps + steps_into_epoch
        start_stage, start_epoch = resumed["stage_index"], resumed["epoch"] + 1
        if resumed["stage_done"]:
            stopping.restore_best(model)
            start_stage, start_epoch = start_stage + 1, 1
        logger.info(
            "resuming from %s at stage %d epoch %d after step %d of it",
            resume_from,
            start_stage,
            start_epoch,
            steps_into_epoch,
        )
        hooks.on_resume(len(history), steps_into_epoch)
    for stage_index, stage in enumerate(plan.stages):
        if stage_index < start_stage:
            continue
        resuming = resumed if stage_index == start_stage else None
        paused = resuming if resuming is not None and "partial" in resuming else None
        # The RNG streams are restored where the interrupted run saved them: before setting
        # up the stage (which may draw from them) when it had finished the previous stage,
        # after it when it had finished an epoch of this one. A paused epoch restores them
        # itself, when it re-creates its batches.
        if resuming is not None and start_epoch == 1 and paused is None:
            _restore_rng(resuming["rng"], shuffle)
        freeze(model, stage.trainable_groups)
        set_batchnorm_mode(model, stage)
        optimizer = make_optimizer(plan, make_param_groups(model, stage))
        module, train_batches, val_batches = data.for_stage(stage)
        scheduler = make_scheduler(optimizer, stage.schedule, stage.epochs * len(train_batches))
        scaler = precision.grad_scaler()
        loss_fn = lwf_loss if stage.distill else plain_loss
        stopping.start_stage()
        first_epoch = 1
        if resuming is not None and (start_epoch > 1 or paused is not None):
            if _param_group_layout(optimizer) != resuming["param_groups"]:
                raise ValueError(f"{resume_from}: optimizer groups differ from the plan's")
            optimizer.load_state_dict(resuming["optimizer"])
            scheduler.load_state_dict(resuming["scheduler"])
            scaler.load_state_dict(resuming["scaler"])
            stopping.epochs_without_improvement = resuming["early_stopping"][
                "epochs_without_improvement"
            ]
            if paused is None:
                _restore_rng(resuming["rng"], shuffle)
            first_epoch = start_epoch
        checkpoint_state = partial(
            _checkpoint,
            plan=plan,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            history=history,
            stopping=stopping,
            shuffle=shuffle,
            stage_index=stage_index,
        )
        for epoch in range(first_epoch, stage.epochs + 1):
            progress.check_cancelled()
            started = time.perf_counter()
            if paused is not None and epoch == first_epoch:
                epoch_rng = paused["partial"]["epoch_start_rng"]
                batches, position = _continue_epoch(train_batches, paused, shuffle, device)
            else:
                # Taken before the iterator draws the epoch's batch order, for a pause to save.
                epoch_rng = _rng_state(shuffle)
                batches, position = iter(train_batches), EpochPosition.start(device)
            try:
                train_loss = train_one_epoch(
                    module,
                    batches,
                    optimizer,
                    scheduler,
                    loss_fn,
                    device,
                    progress.step,
                    precision=precision,
                    scaler=scaler,
                    position=position,
                )
            except TrainingPaused:
                if checkpoint_path is not None:
                    state = checkpoint_state(epoch=epoch - 1, stage_done=False)
                    state["partial"] = {
                        "steps": position.steps,
                        "loss_sum": float(position.loss_sum),
                        "samples": position.samples,
                        "epoch_start_rng": epoch_rng,
                    }
                    save_checkpoint(checkpoint_path, state)
                logger.info(
                    "paused in stage %s epoch %d after step %d of it",
                    stage.name,
                    epoch,
                    position.steps,
                )
                raise
            evaluated = model.head if stage.cache_features else model
            evaluation = evaluate(evaluated, val_batches, device, precision)
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
            stop = stopping.update(model, evaluation)
            if checkpoint_path is not None:
                save_checkpoint(
                    checkpoint_path,
                    checkpoint_state(epoch=epoch, stage_done=stop or epoch == stage.epochs),
                )
            hooks.on_epoch_end(result)
            if stop:
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
