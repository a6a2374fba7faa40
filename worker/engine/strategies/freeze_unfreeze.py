"""`freeze_unfreeze`: the new head alone for `head_epochs`, then everything together."""

from typing import ClassVar

from ..spec import SpecError
from ..stages import Base, Stage, TransferConfig, make_stage
from .base import Strategy, head_only


class FreezeUnfreeze(Strategy):
    name = "freeze_unfreeze"
    takes_head_epochs = True
    joint_stage: ClassVar[str] = "unfreeze"

    def check(self, config: TransferConfig) -> None:
        if config.stages is not None:
            return
        if config.epochs < 2:
            raise SpecError("epochs", f"{self.name} needs epochs >= 2 (head epochs, then the rest)")
        head_epochs = _head_epochs(config)
        if not 1 <= head_epochs < config.epochs:
            raise SpecError(
                "head_epochs",
                f"head_epochs must be between 1 and epochs - 1 = {config.epochs - 1}; "
                f"got {head_epochs}",
            )

    def stages(self, config: TransferConfig, base: Base) -> tuple[Stage, ...]:
        head_epochs = _head_epochs(config)
        return (
            head_only(config, base, head_epochs),
            make_stage(
                config,
                base,
                name=self.joint_stage,
                trainable=base.all_groups,
                epochs=config.epochs - head_epochs,
            ),
        )


def _head_epochs(config: TransferConfig) -> int:
    return config.head_epochs if config.head_epochs is not None else 1
