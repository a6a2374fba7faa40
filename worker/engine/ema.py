"""An exponential moving average of the weights (Polyak averaging, as timm's ModelEmaV2/V3).

With `ema` set, every training step moves a shadow copy of the model towards the trained
weights: shadow = d * shadow + (1 - d) * weights, with the decay warmed up as
d = min(ema, (1 + n) / (10 + n)) over the stage's n steps so far (timm's warm-up), so the
random start of a new head fades within a few steps instead of hundreds. Buffers (BatchNorm's
running statistics) are copied, not averaged, as ModelEmaV2 does with its buffers.

The shadow is what a run evaluates, early-stops on and keeps: each epoch's validation runs
with the shadow swapped into the model (`applied`), and a stage ends with the model holding
the shadow (`finish_stage`), so the next stage, and the exported model, start from the
weights that were validated. Each stage starts the average afresh from the model's weights:
what trains changes between stages. The shadow is saved in every checkpoint
(`state_dict`), so a resumed run keeps averaging exactly where the interrupted one was.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

WARMUP_OFFSET = 10


class WeightAverage:
    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.shadow: dict[str, Tensor] = {}
        self.updates = 0
        """Steps averaged in the current stage."""

    def start_stage(self, model: nn.Module) -> None:
        self.shadow = {name: value.detach().clone() for name, value in model.state_dict().items()}
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (WARMUP_OFFSET + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Average the trainable parameters in; copy the buffers. Frozen parameters do not
        move during a stage, so their shadow, copied at its start, stays equal to them."""
        decay = self.current_decay()
        names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
        trained = dict(model.named_parameters())
        if names:
            torch._foreach_lerp_(
                [self.shadow[name] for name in names],
                [trained[name].detach() for name in names],
                1.0 - decay,
            )
        for name, buffer in model.named_buffers():
            self.shadow[name].copy_(buffer)
        self.updates += 1

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """The model holds the shadow inside the block, its trained weights again after."""
        trained = {name: value.detach().clone() for name, value in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield
        finally:
            model.load_state_dict(trained)

    def finish_stage(self, model: nn.Module) -> None:
        model.load_state_dict(self.shadow)

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": self.shadow, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint's average into a stage already started (`start_stage`), whose
        shadow is on the model's device."""
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
        self.updates = state["updates"]
