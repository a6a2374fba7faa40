"""`lwf`, Learning without Forgetting (Li & Hoiem 2016): a registered model's heads stay as
old tasks and are distilled towards their recorded outputs while the new head learns
(the loss and the all-tasks module: `distillation`, which needs torch)."""

from typing import TYPE_CHECKING

from ...spec import SpecError
from ...stages import Stage, TransferConfig
from ..freeze_unfreeze import FreezeUnfreeze

if TYPE_CHECKING:
    from torch import Tensor, nn

    from ...plan import Plan


class LearningWithoutForgetting(FreezeUnfreeze):
    """The new head alone for `head_epochs`, then everything jointly with distillation."""

    name = "lwf"
    joint_stage = "joint"
    keeps_parent_tasks = True
    needs_parent = "Learning without Forgetting keeps the task of one of your registered models"

    def check(self, config: TransferConfig) -> None:
        super().check(config)
        if config.parent is None:
            raise SpecError(
                "base_model", "the lwf strategy needs parent_dir: the model whose task it keeps"
            )

    def loss(self, plan: "Plan", stage: Stage, class_weights: "Tensor | None") -> "nn.Module":
        if not stage.distill:
            return super().loss(plan, stage, class_weights)
        from .distillation import LwFLoss

        old_sizes = [len(task.labels) for task in plan.old_tasks]
        return LwFLoss(
            plan.label_smoothing,
            old_sizes,
            plan.lwf_temperature,
            plan.lwf_lambda,
            class_weights,
        )
