"""`gradual_unfreeze`: the head alone, then one more backbone group per epoch from the top."""

from ..stages import Base, Stage, TransferConfig
from .base import Strategy, gradual_unfreeze


class GradualUnfreeze(Strategy):
    name = "gradual_unfreeze"

    def stages(self, config: TransferConfig, base: Base) -> tuple[Stage, ...]:
        return gradual_unfreeze(config, base)
