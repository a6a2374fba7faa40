"""`ulmfit` (Howard & Ruder 2018), for modalities that train a masked LM (text): a masked-LM
stage on the dataset's texts (the target-task language model), then gradual unfreezing with
slanted triangular rates, at ULMFiT's `lr_decay` of 2.6."""

from typing import TYPE_CHECKING

from ..spec import ULMFIT_LM_LR, ULMFIT_LR_DECAY
from ..stages import CLASSIFY, LM_HEAD, MASKED_LM, Base, Stage, TransferConfig, make_stage
from .base import ParameterGroups, Strategy, gradual_unfreeze

if TYPE_CHECKING:
    from torch import Tensor, nn

    from ..model import TransferModel
    from ..plan import Plan


class Ulmfit(Strategy):
    name = "ulmfit"
    objectives = frozenset({CLASSIFY, MASKED_LM})
    compiles_own_stages = True
    lr_decay = ULMFIT_LR_DECAY

    def stages(self, config: TransferConfig, base: Base) -> tuple[Stage, ...]:
        return (*_lm_stages(config, base), *gradual_unfreeze(config, base))

    def prepare_model(self, model: "TransferModel", plan: "Plan") -> ParameterGroups:
        # The LM head is its own group (`TransferModel.lm_head`), present with an LM stage only.
        if plan.has_lm_stage:
            model.lm_head = model.backbone.make_lm_head()
        return []

    def loss(self, plan: "Plan", stage: Stage, class_weights: "Tensor | None") -> "nn.Module":
        if stage.objective == MASKED_LM:
            from torch import nn

            return nn.CrossEntropyLoss()
        return super().loss(plan, stage, class_weights)


def _lm_stages(config: TransferConfig, base: Base) -> tuple[Stage, ...]:
    """The target-task language-model stage: the encoder and an LM head, on masked tokens."""
    epochs = config.lm_epochs
    if epochs is None:
        epochs = base.preset.lm_epochs or 0
    if epochs == 0:
        return ()
    return (
        make_stage(
            config,
            base,
            name=MASKED_LM,
            trainable=(*base.backbone_groups, LM_HEAD),
            epochs=epochs,
            top_lr=config.lm_lr if config.lm_lr is not None else ULMFIT_LM_LR,
            schedule="slanted_triangular",
            objective=MASKED_LM,
        ),
    )
