"""The transfer strategies, one module each, and their registry.

`plan.compile_plan`, the model builder, the training loop and the export ask the strategy
named in the plan (`strategy_of`) instead of branching on names. A new strategy is one
module here, one line in `STRATEGIES` and its name in `spec.Strategy`.
"""

from typing import TYPE_CHECKING

from .base import ParameterGroups, Strategy
from .feature_extraction import FeatureExtraction
from .fine_tune import FineTune
from .freeze_unfreeze import FreezeUnfreeze
from .gradual_unfreeze import GradualUnfreeze
from .lora import Lora
from .lwf import LearningWithoutForgetting
from .partial import Partial
from .scratch import Scratch
from .ulmfit import Ulmfit

if TYPE_CHECKING:
    from ..plan import Plan

__all__ = ["STRATEGIES", "ParameterGroups", "Strategy", "strategy_named", "strategy_of"]

STRATEGIES: dict[str, Strategy] = {
    strategy.name: strategy
    for strategy in (
        FeatureExtraction(),
        FineTune(),
        Partial(),
        FreezeUnfreeze(),
        GradualUnfreeze(),
        LearningWithoutForgetting(),
        Scratch(),
        Ulmfit(),
        Lora(),
    )
}
"""In `spec.Strategy`'s order."""


def strategy_named(name: str) -> Strategy:
    return STRATEGIES[name]


def strategy_of(plan: "Plan") -> Strategy:
    """The strategy a plan was compiled by (`fine_tune`'s defaults for a plan that predates
    the note)."""
    return STRATEGIES[plan.extra.get("strategy", "fine_tune")]
