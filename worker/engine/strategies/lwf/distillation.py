"""LwF's distillation loss (Li & Hoiem 2016), and the module training every task."""

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import Tensor, nn

if TYPE_CHECKING:
    from ...model import TransferModel


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
        self,
        label_smoothing: float,
        old_sizes: list[int],
        temperature: float,
        weight: float,
        class_weights: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.cross_entropy = nn.CrossEntropyLoss(
            weight=class_weights, label_smoothing=label_smoothing
        )
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


class AllTasks(nn.Module):
    """Trains an LwF model: forward answers every task, oldest first."""

    def __init__(self, model: "TransferModel") -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.model.forward_tasks(x)
