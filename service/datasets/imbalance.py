"""Whether a dataset's classes are imbalanced enough to train with class weights or a sampler.

A pure function of the class counts the ingest recorded, shown in the dataset report.
"""

from typing import Any

from worker.engine.modalities import dataset_modality

IMBALANCE_RATIO = 3.0
"""Largest over smallest training-class count above which the report flags imbalance: from
there a plain loss visibly neglects the rare classes (tests/engine/test_recipe.py trains at 15:1
and the balanced settings raise minority recall by more than 10 points)."""


def imbalance_report(class_counts: dict[str, Any], modality: str | None) -> dict[str, Any] | None:
    """The largest and smallest class of the training split, their ratio, and whether it
    passes `IMBALANCE_RATIO` (with a suggestion when it does); None without classes."""
    counts = {label: int(count["train"]) for label, count in class_counts.items()}
    if len(counts) < 2:
        return None
    largest = max(counts, key=lambda label: counts[label])
    smallest = min(counts, key=lambda label: counts[label])
    ratio = counts[largest] / counts[smallest] if counts[smallest] else None
    imbalanced = ratio is None or ratio > IMBALANCE_RATIO
    remedy = dataset_modality(modality).imbalance_remedy
    return {
        "imbalanced": imbalanced,
        "ratio": ratio,
        "threshold": IMBALANCE_RATIO,
        "largest": {"label": largest, "train": counts[largest]},
        "smallest": {"label": smallest, "train": counts[smallest]},
        "suggestion": (
            f"Class {largest!r} has {counts[largest]} training items and {smallest!r} "
            f"{counts[smallest]}: train with {remedy} so rare classes count, and compare the "
            "versions' macro_f1 and per-class recall."
            if imbalanced
            else None
        ),
    }
