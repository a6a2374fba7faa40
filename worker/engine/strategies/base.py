"""The `Strategy` protocol: what a transfer strategy decides, and the defaults most keep.

A strategy compiles its stages (`stages`), may refuse a config it cannot run (`check`), may
change the model before training (`prepare_model`: add modules, return extra parameter
groups), chooses a stage's loss (`loss`) and what an exported version stores
(`export_state`). Everything else in the engine reads the plan those stages make, never a
strategy's name.

Importable without torch (the API reads a strategy's declarations); what needs torch is
imported where it runs.
"""

from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from ..stages import CLASSIFY, HEAD, Base, Stage, TransferConfig, make_stage

if TYPE_CHECKING:
    from torch import Tensor, nn

    from ..model import TransferModel
    from ..plan import Plan

ParameterGroups = list[tuple[str, list["nn.Module"]]]


class Strategy(Protocol):
    name: ClassVar[str]
    objectives: ClassVar[frozenset[str]] = frozenset({CLASSIFY})
    """The stage objectives it may compile: it applies to the base models whose modality
    trains them all (`Modality.objectives`)."""
    takes_head_epochs: ClassVar[bool] = False
    """Its first stage trains the new head alone for `head_epochs`."""
    compiles_own_stages: ClassVar[bool] = False
    """It refuses explicit `stages`."""
    keeps_parent_tasks: ClassVar[bool] = False
    """The parent's heads stay in the model as old tasks (LwF)."""
    needs_parent: ClassVar[str | None] = None
    """Why it must start from a registered model, when it must."""
    pretrained: ClassVar[bool] = True
    """False: it starts from random weights whatever the spec's `pretrained` says."""
    added_groups: ClassVar[tuple[str, ...]] = ()
    """Parameter groups `prepare_model` adds, between the backbone and the heads."""
    lr_decay: ClassVar[float | None] = None
    """Its default `lr_decay`, over the modality's."""
    settings: ClassVar[tuple[str, ...]] = ()
    """Spec settings only this strategy reads; the others refuse them."""
    stores_base: ClassVar[bool] = True
    """Its published weights hold the whole model; False: only what it trained (adapters,
    heads), loaded over the base model's weights (`load_state`)."""

    def notes(self, config: TransferConfig, base: Base) -> dict[str, Any]:
        """What it resolved from the spec, kept in `Plan.extra[name]` for `prepare_model`."""
        return {}

    def check(self, config: TransferConfig) -> None:
        """Raise SpecError(field) for a config this strategy cannot run."""
        return None

    def stages(self, config: TransferConfig, base: Base) -> tuple[Stage, ...]: ...

    def prepare_model(self, model: "TransferModel", plan: "Plan") -> ParameterGroups:
        """Change the built (and parent-loaded) model before training or loading weights;
        return the parameter groups it added (named as in `added_groups`)."""
        return []

    def loss(self, plan: "Plan", stage: Stage, class_weights: "Tensor | None") -> "nn.Module":
        from torch import nn

        return nn.CrossEntropyLoss(weight=class_weights, label_smoothing=plan.label_smoothing)

    def export_state(self, model: "TransferModel", plan: "Plan") -> "dict[str, Tensor]":
        """The tensors a published version stores."""
        return dict(model.state_dict())

    def load_state(self, model: "TransferModel", state: "dict[str, Tensor]") -> None:
        """Load what `export_state` stored into a model `prepare_model` prepared (over the
        base model's weights when `stores_base` is False)."""
        model.load_state_dict(state, strict=True)

    def for_inference(self, model: "TransferModel") -> "TransferModel":
        """The trained model as it is served and exported to ONNX (adapters merged)."""
        return model


def head_only(config: TransferConfig, base: Base, epochs: int) -> Stage:
    return make_stage(config, base, name=HEAD, trainable=(HEAD,), epochs=epochs)


def gradual_unfreeze(config: TransferConfig, base: Base) -> tuple[Stage, ...]:
    """ULMFiT: one more group per epoch from the top; the last stage takes what is left."""
    count = min(config.epochs, len(base.backbone_groups) + 1)
    return tuple(
        make_stage(
            config,
            base,
            name=HEAD if k == 0 else f"unfreeze_top_{k}",
            trainable=(HEAD,) if k == 0 else base.top(k),
            epochs=1 if k < count - 1 else config.epochs - k,
            schedule="slanted_triangular",
        )
        for k in range(count)
    )
