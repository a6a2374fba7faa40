"""Successive halving of hopeless trials, asynchronously (ASHA, Li et al. 2020), on validation
accuracy at epoch boundaries: at each rung (epochs 1, 2, 4, 8, …) a trial must be in the top
1/ETA of the trials that have reached that rung so far, or it is pruned: its job is cancelled
and the trial shows `pruned`, with the numbers, never silently dropped. A decision needs at
least MIN_PEERS trials at the rung, and a strategy from random weights (`scratch`) is never
pruned: it is the diagnosis's baseline. Pure functions (standard library only)."""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from worker.engine.strategies import strategy_named

ETA = 2
MIN_PEERS = 3


def is_rung(epoch: int) -> bool:
    """Epochs 1, 2, 4, 8, …"""
    return epoch >= 1 and epoch & (epoch - 1) == 0


@dataclass(frozen=True)
class PruneDecision:
    epoch: int
    val_accuracy: float
    cutoff: float
    peers: int
    """Trials at this rung, this one included."""

    @property
    def reason(self) -> str:
        return (
            f"pruned by successive halving at epoch {self.epoch}: val accuracy "
            f"{self.val_accuracy:.3f} below {self.cutoff:.3f}, the lowest of the top 1/{ETA} "
            f"of {self.peers} trials at that epoch"
        )


def decide(
    *,
    strategy: str,
    val_accuracy: Sequence[float],
    peers: Mapping[str, Sequence[float]],
) -> PruneDecision | None:
    """Whether a running trial with this val accuracy per epoch should stop now, judged at its
    latest epoch if that is a rung, against every other trial's val accuracy at that epoch
    (`peers`: trial id → its curve, finished or running)."""
    epoch = len(val_accuracy)
    if not strategy_named(strategy).pretrained or not is_rung(epoch):
        return None
    mine = val_accuracy[epoch - 1]
    at_rung = [curve[epoch - 1] for curve in peers.values() if len(curve) >= epoch] + [mine]
    if len(at_rung) < MIN_PEERS:
        return None
    kept = math.ceil(len(at_rung) / ETA)
    cutoff = sorted(at_rung, reverse=True)[kept - 1]
    if mine >= cutoff:
        return None
    return PruneDecision(epoch=epoch, val_accuracy=mine, cutoff=cutoff, peers=len(at_rung))
