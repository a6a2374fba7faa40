"""One epoch's training steps, evaluation, and what a run reports to its caller between steps.

Nothing here knows which stage or modality it runs: a function gets a module, batches of
(inputs, targets) and a loss, so the cached-feature head, the whole model and LwF's
every-task module all train through the same `train_one_epoch`.
"""

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from .plan import Plan

Targets = Tensor | Sequence[Tensor]
Batches = Iterable[tuple[Tensor, Targets]]


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
    solved_c: float | None = None
    """A solved head stage's epoch: the L2 strength (scikit-learn's C) it chose."""


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

    def on_checkpoint(self, path: Path) -> None:
        """Called each time `run` has rewritten its checkpoint file (after every epoch, and at
        a pause before TrainingPaused), e.g. to copy it somewhere that outlives this host."""
        return None


class TrainingCancelled(Exception):  # noqa: N818 - public name other code catches
    """`TrainingHooks.should_stop` asked the run to end."""


class TrainingPaused(Exception):  # noqa: N818 - public name other code catches
    """`TrainingHooks.should_pause` asked the run to stop where it can be resumed."""


class Progress:
    """Counts the run's training steps for its hooks, and turns their answers into exceptions."""

    def __init__(self, hooks: TrainingHooks, total_steps: int) -> None:
        self.hooks = hooks
        self.total_steps = total_steps
        self.done_steps = 0

    def check_cancelled(self) -> None:
        if self.hooks.should_stop():
            raise TrainingCancelled(f"cancelled after {self.done_steps} steps")

    def step(self, *, pausable: bool = True) -> None:
        """One step done. `pausable=False`: a step of work that cannot stop half-way (a
        solved head's fit), which may be cancelled but pauses at the epoch's end instead."""
        self.done_steps += 1
        self.hooks.on_progress(self.done_steps, self.total_steps)
        self.check_cancelled()
        if pausable and self.hooks.should_pause():
            raise TrainingPaused(f"paused after {self.done_steps} steps")


@dataclass(frozen=True)
class Evaluation:
    loss: float
    """Plain cross-entropy, without label smoothing, so runs stay comparable."""
    accuracy: float
    predictions: Tensor
    logits: Tensor | None = None
    """(N, classes) on the CPU, for calibration; None in checkpoints written before they were
    kept."""


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


def in_sample_order(rows: Tensor, batches: Batches) -> Tensor:
    """`rows`, one per sample in the order `batches` yielded them, put back in sample order.

    Unshuffled text loaders yield their batches grouped by length, which pads least, and say
    in what order through their batch sampler's `order`; other loaders keep sample order.
    """
    order = getattr(getattr(batches, "batch_sampler", None), "order", None)
    if order is None:
        return rows
    restored = torch.empty_like(rows)
    restored[torch.as_tensor(order, device=rows.device)] = rows
    return restored


def evaluate(
    module: nn.Module,
    batches: Batches,
    device: torch.device,
    precision: Precision | None = None,
    *,
    keep_logits: bool = True,
) -> Evaluation:
    precision = precision or Precision(device.type)
    module.eval()
    total_loss = torch.zeros((), device=device)
    predictions = []
    all_logits = []
    targets_seen = []
    with torch.no_grad(), precision.autocast():
        for inputs, targets in batches:
            assert isinstance(targets, Tensor)
            logits = module(precision.inputs(inputs, device)).float()
            labels = targets.to(device)
            total_loss += nn.functional.cross_entropy(logits, labels, reduction="sum")
            predictions.append(logits.argmax(dim=1))
            if keep_logits:
                all_logits.append(logits)
            targets_seen.append(labels)
    predicted = torch.cat(predictions)
    correct = int((predicted == torch.cat(targets_seen)).sum())
    count = len(predicted)
    kept = in_sample_order(torch.cat(all_logits), batches).cpu() if keep_logits else None
    return Evaluation(
        float(total_loss) / count,
        correct / count,
        in_sample_order(predicted, batches).cpu(),
        kept,
    )


def classification_metrics(
    targets: Tensor, predictions: Tensor, classes: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro-F1 (the unweighted mean over classes, so a rare class counts as much as a
    common one), per-class precision/recall/F1/support and the confusion matrix (rows: true)."""
    size = len(classes)
    confusion = torch.zeros(size, size, dtype=torch.int64)
    confusion.index_put_((targets, predictions), torch.ones_like(targets), accumulate=True)
    per_class = []
    f1_scores = []
    for index, label in enumerate(classes):
        hits = int(confusion[index, index])
        predicted = int(confusion[:, index].sum())
        support = int(confusion[index].sum())
        precision = hits / predicted if predicted else 0.0
        recall = hits / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        f1_scores.append(f1)
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
        "macro_f1": sum(f1_scores) / size,
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
        "classes": list(classes),
    }
