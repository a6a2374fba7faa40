"""`scratch`: the architecture from random weights, every group at `lr` (the baseline a
transfer is measured against)."""

from ..spec import SpecError
from ..stages import Base, Stage, TransferConfig, make_stage
from .base import Strategy


class Scratch(Strategy):
    name = "scratch"
    pretrained = False

    def check(self, config: TransferConfig) -> None:
        if config.parent is not None:
            raise SpecError(
                "base_model", "the scratch strategy starts from random weights; drop parent_dir"
            )

    def stages(self, config: TransferConfig, base: Base) -> tuple[Stage, ...]:
        return (
            make_stage(
                config,
                base,
                name="scratch",
                trainable=base.all_groups,
                epochs=config.epochs,
                top_lr=base.rates(config)[0],
                lr_decay=1.0,
                bn_mode="train",
                follows_lr=True,
            ),
        )
