"""`fine_tune`: every group trains from the start, at discriminative rates."""

from ..stages import Base, Stage, TransferConfig, make_stage
from .base import Strategy


class FineTune(Strategy):
    name = "fine_tune"

    def stages(self, config: TransferConfig, base: Base) -> tuple[Stage, ...]:
        return (
            make_stage(
                config, base, name="fine_tune", trainable=base.all_groups, epochs=config.epochs
            ),
        )
