"""`lora` (Hu et al. 2021), through Hugging Face's `peft`: low-rank adapters beside chosen
backbone modules train with the new head, while the pretrained weights stay frozen.

The adapted modules are the zoo family's (`Backbone.adapter_targets`: attention projections
for BERT-family and ViT, pointwise convolutions for EfficientNet) or `lora_targets`. A
published version stores only the adapters and the heads (`stores_base` False); its plan
names the base model, whose pretrained weights it is loaded over. Served and exported to
ONNX, the adapters are merged into the weights they adapt, so inference costs nothing more.
"""

from typing import TYPE_CHECKING, Any

from ..spec import SpecError
from ..stages import HEAD, Base, Stage, TransferConfig, make_stage
from .base import ParameterGroups, Strategy

if TYPE_CHECKING:
    from torch import Tensor

    from ..model import TransferModel
    from ..plan import Plan

ADAPTER = "adapter"
"""The parameter group of every adapter's weights."""
DEFAULT_RANK = 8
RANKS = {"efficientnet_lite": 4, "efficientnet": 4, "mobilenet_v3": 4}
"""The default rank where it is not 8: these nets are mostly pointwise convolutions, so
rank 4 keeps the trainable share near 2 % of the parameters."""


class Lora(Strategy):
    name = "lora"
    added_groups = (ADAPTER,)
    settings = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")
    stores_base = False

    def check(self, config: TransferConfig) -> None:
        if config.parent is not None:
            raise SpecError(
                "base_model",
                "base_model: lora adapts a zoo model's pretrained weights (its version stores "
                "only the adapters over them); start it from a zoo model",
            )
        if not config.pretrained:
            raise SpecError(
                "pretrained", "pretrained: lora adapts pretrained weights; drop pretrained: false"
            )

    def notes(self, config: TransferConfig, base: Base) -> dict[str, Any]:
        rank = config.lora_rank or RANKS.get(base.family, DEFAULT_RANK)
        return {
            "rank": rank,
            "alpha": config.lora_alpha if config.lora_alpha is not None else 2.0 * rank,
            "dropout": config.lora_dropout or 0.0,
            "targets": list(config.lora_targets) if config.lora_targets is not None else None,
        }

    def stages(self, config: TransferConfig, base: Base) -> tuple[Stage, ...]:
        # The adapters start at zero (B = 0), so they and the new head take the head's rate
        # from the first step; the frozen backbone keeps its BatchNorm statistics.
        return (
            make_stage(
                config,
                base,
                name="lora",
                trainable=(ADAPTER, HEAD),
                epochs=config.epochs,
                top_lr=base.rates(config)[0],
                lr_decay=1.0,
                bn_mode="frozen",
                follows_lr=True,
            ),
        )

    def prepare_model(self, model: "TransferModel", plan: "Plan") -> ParameterGroups:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        notes = plan.extra[self.name]
        wanted = tuple(notes["targets"]) if notes["targets"] is not None else None
        config = LoraConfig(
            r=notes["rank"],
            lora_alpha=notes["alpha"],
            lora_dropout=notes["dropout"],
            target_modules=model.backbone.adapter_targets(wanted),
        )
        inject_adapter_in_model(config, model.backbone)
        layers = [m for m in model.backbone.modules() if isinstance(m, LoraLayer)]
        return [(ADAPTER, [part for layer in layers for part in (layer.lora_A, layer.lora_B)])]

    def export_state(self, model: "TransferModel", plan: "Plan") -> "dict[str, Tensor]":
        return {name: tensor for name, tensor in model.state_dict().items() if _is_trained(name)}

    def load_state(self, model: "TransferModel", state: "dict[str, Tensor]") -> None:
        loaded = model.load_state_dict(state, strict=False)
        missing = [name for name in loaded.missing_keys if _is_trained(name)]
        if loaded.unexpected_keys or missing:
            raise ValueError(
                "the adapter weights do not fit the model: "
                f"unexpected {loaded.unexpected_keys[:3]}, missing {missing[:3]}"
            )

    def for_inference(self, model: "TransferModel") -> "TransferModel":
        from peft.tuners.lora import LoraLayer

        adapted = [
            (name, module)
            for name, module in model.backbone.named_modules()
            if isinstance(module, LoraLayer)
        ]
        for name, layer in adapted:
            layer.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.backbone.get_submodule(parent), child, layer.get_base_layer())
        model.added_groups = []
        return model


def _is_trained(name: str) -> bool:
    """What a lora version stores: the adapters and everything outside the backbone (heads)."""
    return "lora_" in name or not name.startswith("backbone.")
