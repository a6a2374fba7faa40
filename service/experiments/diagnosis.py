"""The diagnosis of an experiment: per base model, each transfer strategy against `scratch`.

Pure functions of recorded trials (their per-epoch curves, their per-item results on the
experiment's test split, their wall time), so they are tested on recorded curves alone. The three
benefits of transfer it measures are the literature's: a higher **start** (val accuracy after the
first epoch), a steeper **slope** (epochs to reach 90 % of scratch's best val accuracy, and the
area under the val curve), a higher **asymptote** (test accuracy, with a paired bootstrap
interval of the difference). `negative_transfer` is raised when transfer is worse than scratch
beyond that interval; `overfitting` when a trial's val loss climbs while its train loss falls.

Trials repeated over seeds are pooled per (base model, strategy): curves are averaged epoch by
epoch, and per-item test results are averaged before the bootstrap.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.experiments.statistics import bootstrap_interval
from worker.engine.strategies import strategy_named

SLOPE_TARGET = 0.9
"""Slope: epochs to reach this share of scratch's best val accuracy."""
OVERFIT_VAL_LOSS_RISE = 0.10
"""Overfitting: the last val loss is this much (relative) above the best one, while the train
loss kept falling after that best epoch."""
CHEAP_SHARE = 0.95
"""A summary line names a strategy that reaches this share of the best test accuracy for less."""


@dataclass(frozen=True)
class EpochPoint:
    train_loss: float
    val_loss: float
    val_accuracy: float


@dataclass(frozen=True)
class TrialRecord:
    """What the diagnosis needs of one finished trial."""

    trial_id: str
    base_model: str
    strategy: str
    curve: Sequence[EpochPoint]
    test_correct: Sequence[float] | None
    """1.0/0.0 per test item, in the test split's order; None if it was not evaluated."""
    wall_seconds: float | None


@dataclass(frozen=True)
class _Arm:
    """One (base model, strategy), its seeds pooled."""

    strategy: str
    val_accuracy: list[float]
    test_correct: np.ndarray | None
    wall_seconds: float | None
    trials: int

    @property
    def test_accuracy(self) -> float | None:
        return None if self.test_correct is None else float(self.test_correct.mean())

    @property
    def best_val(self) -> float:
        return max(self.val_accuracy)


def _pool(strategy: str, records: Sequence[TrialRecord]) -> _Arm:
    length = max(len(r.curve) for r in records)
    val = [
        float(np.mean([r.curve[e].val_accuracy for r in records if e < len(r.curve)]))
        for e in range(length)
    ]
    evaluated = [np.asarray(r.test_correct, dtype=np.float64) for r in records if r.test_correct]
    sizes = {item.size for item in evaluated}
    test = np.mean(evaluated, axis=0) if evaluated and len(sizes) == 1 else None
    walls = [r.wall_seconds for r in records if r.wall_seconds is not None]
    return _Arm(
        strategy=strategy,
        val_accuracy=val,
        test_correct=test,
        wall_seconds=float(np.mean(walls)) if walls else None,
        trials=len(records),
    )


def epochs_to_reach(val_accuracy: Sequence[float], threshold: float) -> int | None:
    """The first epoch (1-based) whose val accuracy reaches `threshold`; None if none does."""
    for epoch, value in enumerate(val_accuracy, start=1):
        if value >= threshold:
            return epoch
    return None


def area_under_curve(val_accuracy: Sequence[float], epochs: int) -> float:
    """The mean val accuracy over the first `epochs` epochs: the area under the val curve,
    normalised so that 1.0 is perfect from the first epoch on."""
    return float(np.mean(val_accuracy[:epochs]))


def overfitting(curve: Sequence[EpochPoint]) -> dict[str, Any]:
    """Whether train and val diverged: after the epoch with the lowest val loss, val loss rose
    by more than OVERFIT_VAL_LOSS_RISE while train loss still fell. With the numbers."""
    if len(curve) < 2:
        return {"flag": False, "reason": "fewer than two epochs"}
    best = min(range(len(curve)), key=lambda e: curve[e].val_loss)
    last = curve[-1]
    rise = (last.val_loss - curve[best].val_loss) / max(curve[best].val_loss, 1e-12)
    train_fell = last.train_loss < curve[best].train_loss
    return {
        "flag": bool(best < len(curve) - 1 and rise > OVERFIT_VAL_LOSS_RISE and train_fell),
        "best_val_loss_epoch": best + 1,
        "best_val_loss": curve[best].val_loss,
        "last_val_loss": last.val_loss,
        "val_loss_rise": rise,
        "train_loss_at_best": curve[best].train_loss,
        "last_train_loss": last.train_loss,
    }


def _epochs(count: int) -> str:
    return f"{count} epoch" + ("" if count == 1 else "s")


def _points(value: float) -> str:
    return f"{100 * value:.1f}"


def _compare(transfer: _Arm, scratch: _Arm, *, seed: int) -> dict[str, Any]:
    threshold = SLOPE_TARGET * scratch.best_val
    common = min(len(transfer.val_accuracy), len(scratch.val_accuracy))
    comparison: dict[str, Any] = {
        "strategy": transfer.strategy,
        "trials": transfer.trials,
        "start": {
            "transfer": transfer.val_accuracy[0],
            "scratch": scratch.val_accuracy[0],
            "difference": transfer.val_accuracy[0] - scratch.val_accuracy[0],
        },
        "slope": {
            "threshold": threshold,
            "epochs_to_threshold": {
                "transfer": epochs_to_reach(transfer.val_accuracy, threshold),
                "scratch": epochs_to_reach(scratch.val_accuracy, threshold),
            },
            "area_under_val_curve": {
                "epochs": common,
                "transfer": area_under_curve(transfer.val_accuracy, common),
                "scratch": area_under_curve(scratch.val_accuracy, common),
            },
        },
        "asymptote": None,
        "negative_transfer": False,
        "helps": False,
        "cost": {
            "wall_seconds": {"transfer": transfer.wall_seconds, "scratch": scratch.wall_seconds}
        },
    }
    if (
        transfer.test_correct is not None
        and scratch.test_correct is not None
        and transfer.test_correct.size == scratch.test_correct.size
    ):
        difference = transfer.test_correct - scratch.test_correct
        low, high = bootstrap_interval(difference, seed=seed)
        comparison["asymptote"] = {
            "transfer": transfer.test_accuracy,
            "scratch": scratch.test_accuracy,
            "difference": float(difference.mean()),
            "interval": [low, high],
            "test_items": int(difference.size),
        }
        comparison["negative_transfer"] = high < 0.0
        comparison["helps"] = low > 0.0
    return comparison


def _comparison_lines(base_model: str, comparison: dict[str, Any]) -> list[str]:
    name = comparison["strategy"]
    start = comparison["start"]
    lines = [
        f"{base_model}/{name}: start {_points(start['transfer'])} % val accuracy after epoch 1 "
        f"against scratch's {_points(start['scratch'])} %."
    ]
    slope = comparison["slope"]
    reached = slope["epochs_to_threshold"]
    area = slope["area_under_val_curve"]
    lines.append(
        f"{base_model}/{name}: reached 90 % of scratch's best val accuracy "
        f"({_points(slope['threshold'])} %) "
        + (f"in {_epochs(reached['transfer'])}" if reached["transfer"] else "in no epoch")
        + " (scratch: "
        + (_epochs(reached["scratch"]) if reached["scratch"] else "never")
        + f"); area under the val curve {area['transfer']:.3f} vs {area['scratch']:.3f} "
        f"over {area['epochs']} epochs."
    )
    asymptote = comparison["asymptote"]
    if asymptote is None:
        lines.append(f"{base_model}/{name}: no test result to compare with scratch.")
        return lines
    low, high = asymptote["interval"]
    numbers = (
        f"test accuracy {_points(asymptote['transfer'])} % vs {_points(asymptote['scratch'])} % "
        f"on {asymptote['test_items']} items, difference {_points(asymptote['difference'])} "
        f"points, 95 % interval {_points(low)} to {_points(high)}"
    )
    if comparison["negative_transfer"]:
        lines.append(f"{base_model}/{name}: negative transfer: worse than scratch ({numbers}).")
    elif comparison["helps"]:
        lines.append(f"{base_model}/{name}: beat scratch ({numbers}).")
    else:
        lines.append(f"{base_model}/{name}: no clear difference from scratch ({numbers}).")
    return lines


def _cost_lines(base_model: str, arms: Sequence[_Arm]) -> list[str]:
    """Strategies that get close to the best test accuracy for a fraction of its wall time."""
    scored = [
        (arm.strategy, arm.test_accuracy, arm.wall_seconds)
        for arm in arms
        if arm.test_accuracy is not None and arm.wall_seconds
    ]
    if len(scored) < 2:
        return []
    # The leader as the leaderboard has it: best test accuracy, ties to the cheaper.
    best_name, best_accuracy, best_wall = max(scored, key=lambda item: (item[1], -item[2]))
    lines = []
    for name, accuracy, wall in scored:
        if name == best_name or best_accuracy <= 0 or wall >= best_wall:
            continue
        share = accuracy / best_accuracy
        if share >= CHEAP_SHARE:
            lines.append(
                f"{base_model}/{name} reached {share:.0%} of {best_name}'s test accuracy "
                f"({_points(accuracy)} % vs {_points(best_accuracy)} %) at "
                f"1/{best_wall / wall:.1f} of its wall time ({wall:.1f} s vs {best_wall:.1f} s)."
            )
    return lines


def diagnose(records: Sequence[TrialRecord], *, seed: int = 0) -> dict[str, Any]:
    """Per base model: each transfer strategy against scratch, overfitting per trial, and
    plain-language summary lines that each carry the numbers they rest on."""
    usable = [r for r in records if r.curve]
    base_models: list[dict[str, Any]] = []
    summary: list[str] = []
    for base_model in dict.fromkeys(r.base_model for r in usable):
        mine = [r for r in usable if r.base_model == base_model]
        arms = {
            strategy: _pool(strategy, [r for r in mine if r.strategy == strategy])
            for strategy in dict.fromkeys(r.strategy for r in mine)
        }
        # The baseline is the strategy that starts from random weights (`scratch`).
        transfers = {s: arm for s, arm in arms.items() if strategy_named(s).pretrained}
        scratch = next((arm for s, arm in arms.items() if s not in transfers), None)
        comparisons = (
            []
            if scratch is None
            else [_compare(arm, scratch, seed=seed) for arm in transfers.values()]
        )
        overfit = [
            {"trial_id": r.trial_id, "strategy": r.strategy, **overfitting(r.curve)} for r in mine
        ]
        if scratch is None:
            summary.append(
                f"{base_model}: no finished scratch trial, so transfer cannot be judged against "
                "training from scratch."
            )
        for comparison in comparisons:
            summary += _comparison_lines(base_model, comparison)
        summary += _cost_lines(base_model, list(arms.values()))
        for item in overfit:
            if item["flag"]:
                summary.append(
                    f"{base_model}/{item['strategy']} ({item['trial_id']}): overfitting: val loss "
                    f"rose {item['val_loss_rise']:.0%} after epoch {item['best_val_loss_epoch']} "
                    f"({item['best_val_loss']:.3f} → {item['last_val_loss']:.3f}) while train "
                    f"loss fell ({item['train_loss_at_best']:.3f} → {item['last_train_loss']:.3f})."
                )
        base_models.append(
            {
                "base_model": base_model,
                "scratch": None
                if scratch is None
                else {
                    "trials": scratch.trials,
                    "best_val_accuracy": scratch.best_val,
                    "test_accuracy": scratch.test_accuracy,
                },
                "comparisons": comparisons,
                "overfitting": overfit,
            }
        )
    return {
        "base_models": base_models,
        "negative_transfer": [
            f"{b['base_model']}/{c['strategy']}"
            for b in base_models
            for c in b["comparisons"]
            if c["negative_transfer"]
        ],
        "summary": summary,
    }
