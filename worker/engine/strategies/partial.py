"""`partial`: the top `partial_groups` backbone groups and the head train; the rest stays."""

from ..spec import SpecError
from ..stages import Base, Stage, TransferConfig, make_stage
from .base import Strategy


class Partial(Strategy):
    name = "partial"

    def stages(self, config: TransferConfig, base: Base) -> tuple[Stage, ...]:
        if config.partial_groups > len(base.backbone_groups):
            raise SpecError(
                "partial_groups",
                f"partial_groups: {base.base_model} has {len(base.backbone_groups)} groups; "
                f"got {config.partial_groups}",
            )
        trainable = base.top(config.partial_groups)
        return (
            make_stage(config, base, name="partial", trainable=trainable, epochs=config.epochs),
        )
