"""How a stage's training is steered: the optimizer, the per-step rate schedule, early stopping."""

import math
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from .loop import Evaluation
from .plan import Plan
from .spec import Schedule

ONE_CYCLE_PCT_START = 0.3
ONE_CYCLE_DIV_FACTOR = 25.0
ONE_CYCLE_FINAL_DIV_FACTOR = 1e4
STLR_CUT_FRAC = 0.1
STLR_RATIO = 32.0


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


class EarlyStopping:
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
