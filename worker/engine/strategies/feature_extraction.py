"""`feature_extraction`: the new head alone, on the frozen backbone's (cached) features."""

from ..stages import Base, Stage, TransferConfig
from .base import Strategy, head_only


class FeatureExtraction(Strategy):
    name = "feature_extraction"

    def stages(self, config: TransferConfig, base: Base) -> tuple[Stage, ...]:
        return (head_only(config, base, config.epochs),)
