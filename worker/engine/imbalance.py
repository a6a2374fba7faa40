"""Imbalanced classes: loss weights and a balanced sampler, both from the training labels.

`class_weights: "balanced"` weighs class c's loss by n / (C * n_c) (scikit-learn's
"balanced"), so the loss counts every class as much as the others. `sampler: "balanced"`
instead draws each epoch's samples with probability 1 / n_c of their class, with replacement:
every class is seen about equally often, and an epoch keeps its length. The sampler draws
from the run's shuffle generator, like a shuffled loader, so a resumed run draws the same
batches again.
"""

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import WeightedRandomSampler

from .plan import Plan


def class_counts(labels: Sequence[int], num_classes: int) -> Tensor:
    return torch.bincount(torch.as_tensor(list(labels), dtype=torch.int64), minlength=num_classes)


def balanced_class_weights(labels: Sequence[int], num_classes: int) -> Tensor:
    """n / (C * n_c) per class; a class absent from training gets 0 (it has no loss term)."""
    counts = class_counts(labels, num_classes).double()
    weights = len(labels) / (num_classes * counts.clamp(min=1))
    return torch.where(counts > 0, weights, torch.zeros_like(weights)).float()


def loss_weights(plan: Plan, labels: Sequence[int]) -> Tensor | None:
    """The cross-entropy's class weights the plan asks for, or None for unweighted."""
    if plan.class_weights == "balanced":
        return balanced_class_weights(labels, plan.num_classes)
    return None


def training_sampler(
    plan: Plan, labels: Sequence[int], generator: torch.Generator
) -> WeightedRandomSampler | None:
    """The sampler of the training batches, or None for the plain shuffle."""
    if plan.sampler != "balanced":
        return None
    counts = class_counts(labels, plan.num_classes).double()
    per_sample = 1.0 / counts[torch.as_tensor(list(labels), dtype=torch.int64)]
    return WeightedRandomSampler(
        per_sample.tolist(), num_samples=len(labels), replacement=True, generator=generator
    )
