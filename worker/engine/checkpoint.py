"""The checkpoint file `run` writes after every epoch and at a pause, and the random state in it.

The layout is a plain dict that `torch.load(..., weights_only=True)` reads:

- "plan": `Plan.to_dict()`; a checkpoint resumes only the plan that wrote it.
- "stage_index", "epoch": the stage, and how many of its epochs were complete.
- "stage_done": that stage has ended (last epoch, or early stopping).
- "model", "optimizer", "scheduler", "scaler": state dicts; "param_groups": the optimizer's
  group names and parameter shapes, checked before its state is loaded.
- "history": every `EpochResult` so far, as dicts; "early_stopping": `EarlyStopping.state_dict()`.
- "rng": the random streams when the file was written (`rng_state`).
- "ema", only when the plan averages weights (`ema.WeightAverage.state_dict()`): the stage's
  "shadow" weights and the "updates" averaged into them.
- "partial", only in a checkpoint written at a pause inside an epoch: "steps" done, their
  "loss_sum" and "samples", and "epoch_start_rng", the random streams before the epoch drew
  its batch order.

Jobs paused by earlier code resume from these files, so a change here must keep reading them.
"""

import os
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR

from .loop import EpochPosition, EpochResult
from .model import TransferModel
from .optim import EarlyStopping
from .plan import Plan


def rng_state(shuffle: torch.Generator) -> dict[str, Any]:
    """Every random stream training draws from: Python's, NumPy's, torch's, and the shuffle's."""
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


def restore_rng(state: dict[str, Any], shuffle: torch.Generator) -> None:
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


def param_group_layout(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [
        {"name": group["name"], "parameters": [tuple(p.shape) for p in group["params"]]}
        for group in optimizer.param_groups
    ]


def checkpoint_state(
    *,
    plan: Plan,
    model: TransferModel,
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    scaler: torch.amp.GradScaler,
    history: list[EpochResult],
    stopping: EarlyStopping,
    shuffle: torch.Generator,
    stage_index: int,
    epoch: int,
    stage_done: bool,
    partial: dict[str, Any] | None = None,
    ema: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What `run` needs to continue after the last completed `epoch` of the stage.

    `partial`, from `partial_epoch`, is given at a pause inside the epoch after that one.
    """
    state = {
        "plan": plan.to_dict(),
        "stage_index": stage_index,
        "epoch": epoch,
        "stage_done": stage_done,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "param_groups": param_group_layout(optimizer),
        "history": [asdict(entry) for entry in history],
        "early_stopping": stopping.state_dict(),
        "rng": rng_state(shuffle),
    }
    if partial is not None:
        state["partial"] = partial
    if ema is not None:
        state["ema"] = ema
    return state


def partial_epoch(position: EpochPosition, epoch_start_rng: dict[str, Any]) -> dict[str, Any]:
    """The "partial" entry of a checkpoint written at a pause inside an epoch."""
    return {
        "steps": position.steps,
        "loss_sum": float(position.loss_sum),
        "samples": position.samples,
        "epoch_start_rng": epoch_start_rng,
    }


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write via a temporary file so a crash never leaves a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    torch.save(state, partial)
    os.replace(partial, path)


def load_checkpoint(path: Path, plan: Plan) -> dict[str, Any]:
    """A checkpoint `run` wrote for this same plan; raises ValueError for another plan's."""
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    stored = dict(state["plan"])
    if "parent_dir" in stored and "parent" not in stored:
        # Written before parents were named by key: the host path it names is the parent the
        # job's plan now names by key (migration 0006 rewrote that plan from this same path).
        stored["parent"] = plan.parent
    if Plan.from_dict(stored) != plan:
        raise ValueError(f"{path} was written for a different plan")
    return state
