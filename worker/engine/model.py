"""The transfer model (zoo backbone + new head) and the knobs a stage turns on it."""

from pathlib import Path
from typing import Any, Self

from torch import Tensor, nn

from .plan import HEAD, HeadConfig, Plan, Stage
from .zoo import Backbone, build_backbone


def build_head(feature_dim: int, config: HeadConfig, num_classes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = feature_dim
    for hidden in config.hidden:
        if config.dropout:
            layers.append(nn.Dropout(config.dropout))
        layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
        width = hidden
    if config.dropout:
        layers.append(nn.Dropout(config.dropout))
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class TransferModel(nn.Module):
    def __init__(self, backbone: Backbone, head: nn.Sequential) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self._frozen_batchnorm: tuple[str, ...] = ()

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.head(self.backbone(x))
        return logits

    def groups(self) -> list[tuple[str, list[nn.Module]]]:
        """Parameter groups, input to output; the head is always the last, named "head"."""
        return [*self.backbone.groups(), (HEAD, [self.head])]

    def freeze_batchnorm(self, module_names: tuple[str, ...]) -> None:
        """Keep these BatchNorm modules in eval mode, whatever `train()` later asks for."""
        self._frozen_batchnorm = module_names
        self.train(self.training)

    def train(self, mode: bool = True) -> Self:
        # nn.Module.train flips every submodule, which would let frozen BatchNorm update its
        # running statistics again; put those modules back into eval after every call.
        super().train(mode)
        for name in self._frozen_batchnorm:
            self.get_submodule(name).eval()
        return self


def build_model(
    plan: Plan, *, weights_dir: Path | None, pretrained: bool | None = None
) -> TransferModel:
    """Build backbone + head; `pretrained=None` follows the plan."""
    backbone = build_backbone(
        plan.base_model,
        pretrained=plan.pretrained if pretrained is None else pretrained,
        weights_dir=weights_dir,
    )
    head = build_head(backbone.info.feature_dim, plan.head, plan.num_classes)
    return TransferModel(backbone, head)


def freeze(model: TransferModel, trainable_groups: tuple[str, ...]) -> None:
    """Let exactly the parameters of `trainable_groups` receive gradients."""
    known = [name for name, _ in model.groups()]
    unknown = set(trainable_groups) - set(known)
    if unknown:
        raise ValueError(f"unknown parameter groups {sorted(unknown)}; known: {known}")
    for name, modules in model.groups():
        for module in modules:
            module.requires_grad_(name in trainable_groups)


def set_batchnorm_mode(model: TransferModel, stage: Stage) -> None:
    """Freeze BatchNorm statistics in frozen groups, or everywhere when bn_mode is "frozen".

    Frozen groups must not drift through their running statistics either: a frozen group
    whose BatchNorm kept updating would change what the next layers see.
    """
    names = {id(module): name for name, module in model.named_modules()}
    frozen = []
    for group, modules in model.groups():
        if stage.bn_mode == "train" and group in stage.trainable_groups:
            continue
        for module in modules:
            frozen += [
                names[id(sub)]
                for sub in module.modules()
                if isinstance(sub, nn.modules.batchnorm._BatchNorm)
            ]
    model.freeze_batchnorm(tuple(frozen))


def make_param_groups(model: TransferModel, stage: Stage) -> list[dict[str, Any]]:
    """One optimizer group per trainable parameter group, at the stage's rate for it."""
    return [
        {
            "name": name,
            "lr": stage.group_lrs[name],
            "params": [p for module in modules for p in module.parameters() if p.requires_grad],
        }
        for name, modules in model.groups()
        if name in stage.trainable_groups
    ]
