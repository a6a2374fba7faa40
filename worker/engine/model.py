"""The transfer model (zoo backbone + new head) and the knobs a stage turns on it."""

import logging
from pathlib import Path
from typing import Any, Self

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from .artifacts import WEIGHTS_FILE, ModelConfig, read_model_config
from .modalities import modality_for
from .plan import HEAD, LM_HEAD, OLD_HEADS, HeadConfig, Plan, Stage, steps_per_epoch
from .recipe import stage_recipes
from .strategies import ParameterGroups, strategy_of
from .zoo import Backbone, build_backbone

logger = logging.getLogger(__name__)


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
    """Backbone + the new task's head, and for LwF the heads of the tasks kept from a parent.

    `forward` answers the new task; `forward_tasks` answers every task, oldest first. A model
    without old tasks has exactly the state dict it had before LwF existed.
    """

    def __init__(
        self,
        backbone: Backbone,
        head: nn.Sequential,
        old_heads: list[nn.Sequential] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.old_heads = nn.ModuleList(old_heads or [])
        self.lm_head: nn.Module | None = None
        """ulmfit: the masked-LM head its LM stage trains (text models with that stage only)."""
        self.added_groups: ParameterGroups = []
        """The groups the plan's strategy added (`Strategy.prepare_model`); their modules
        live inside the backbone, so their state is the backbone's."""
        self._frozen_batchnorm: tuple[str, ...] = ()

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.head(self.backbone(x))
        return logits

    def forward_tasks(self, x: Tensor) -> list[Tensor]:
        return self.forward_with_features(x)[1]

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The pooled backbone features (the space monitoring watches) and every task's logits,
        oldest first, from one pass."""
        features = self.backbone(x)
        return features, [head(features) for head in [*self.old_heads, self.head]]

    def groups(self) -> list[tuple[str, list[nn.Module]]]:
        """Parameter groups, input to output; the new head is always the last, named "head"."""
        old: list[tuple[str, list[nn.Module]]] = (
            [(OLD_HEADS, [self.old_heads])] if len(self.old_heads) else []
        )
        lm: list[tuple[str, list[nn.Module]]] = (
            [(LM_HEAD, [self.lm_head])] if self.lm_head is not None else []
        )
        # After the backbone's groups: freezing a backbone group freezes the modules a
        # strategy added inside it, and its own group then decides for them.
        return [*self.backbone.groups(), *self.added_groups, *lm, *old, (HEAD, [self.head])]

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


def _load_parent(model: TransferModel, parent_dir: Path, weights_dir: Path | None) -> None:
    """Start from an exported model: its backbone, and its heads as the old tasks' heads.

    The parent's own old heads come first and its newest head last, matching `old_tasks`.
    A parent that stored only what it trained (`Strategy.stores_base` False) is rebuilt over
    its base model's weights first.
    """
    state = load_exported(parent_dir, weights_dir=weights_dir).state_dict()
    backbone = {
        k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")
    }
    model.backbone.load_state_dict(backbone, strict=True)
    if len(model.old_heads):
        parent_heads = len({k.split(".")[1] for k in state if k.startswith("old_heads.")})
        heads = {
            k.removeprefix("old_heads."): v for k, v in state.items() if k.startswith("old_heads.")
        }
        heads |= {
            f"{parent_heads}.{k.removeprefix('head.')}": v
            for k, v in state.items()
            if k.startswith("head.")
        }
        model.old_heads.load_state_dict(heads, strict=True)
    logger.info("started from the weights of %s", parent_dir)


def build_model(
    plan: Plan,
    *,
    weights_dir: Path | None,
    pretrained: bool | None = None,
    parent_dir: Path | None = None,
) -> TransferModel:
    """Build backbone + head; `pretrained=None` follows the plan.

    Pretrained weights come from the plan's parent model when it has one (chained transfer),
    whose exported files are in the local folder `parent_dir`; else from the zoo's ImageNet
    weights in `weights_dir`.
    """
    use_weights = plan.pretrained if pretrained is None else pretrained
    if use_weights and plan.parent is not None and parent_dir is None:
        raise ValueError(
            f"the plan starts from the model {plan.parent}: pass its folder as parent_dir"
        )
    backbone = build_backbone(
        plan.base_model,
        pretrained=use_weights and plan.parent is None,
        weights_dir=weights_dir,
    )
    feature_dim = backbone.info.feature_dim
    head = build_head(feature_dim, plan.head, plan.num_classes)
    old_heads = [build_head(feature_dim, task.head, len(task.labels)) for task in plan.old_tasks]
    model = TransferModel(backbone, head, old_heads)
    if use_weights and parent_dir is not None:
        _load_parent(model, parent_dir, weights_dir)
    model.added_groups = strategy_of(plan).prepare_model(model, plan)
    return model


def build_model_for_export(plan: Plan, config: ModelConfig) -> TransferModel:
    """The architecture of exported model `config`, to load its weights into: no pretrained
    weights are read, and a text model's encoder is built from its exported `transformers`
    config."""
    backbone = modality_for(plan.modality).exported_backbone(plan.base_model, config)
    feature_dim = backbone.info.feature_dim
    old_heads = [build_head(feature_dim, task.head, len(task.labels)) for task in plan.old_tasks]
    model = TransferModel(backbone, build_head(feature_dim, plan.head, plan.num_classes), old_heads)
    model.added_groups = strategy_of(plan).prepare_model(model, plan)
    return model


def load_exported(model_dir: Path, *, weights_dir: Path | None = None) -> TransferModel:
    """The model an exported folder holds, as it is served (`Strategy.for_inference`).

    A folder whose strategy stores only what it trained (LoRA's adapters and the heads) is
    loaded over its base model's pretrained weights, from `weights_dir` (or the zoo's
    packaged files)."""
    exported = read_model_config(model_dir)
    plan = Plan.from_dict(exported.plan)
    strategy = strategy_of(plan)
    state = load_file(model_dir / WEIGHTS_FILE)
    if strategy.stores_base:
        # The exported weights replace everything, so no pretrained weights are needed.
        model = build_model_for_export(plan, exported)
    else:
        model = build_model(plan, weights_dir=weights_dir)
    strategy.load_state(model, state)
    return strategy.for_inference(model)


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


def preview_plan(
    plan: Plan, *, weights_dir: Path | None, train_size: int | None = None
) -> list[dict[str, Any]]:
    """`describe_plan` of the plan's model built on the meta device: every shape and count,
    no weights allocated or initialised (what job creation and experiments show)."""
    with torch.device("meta"):
        model = build_model(plan, weights_dir=weights_dir, pretrained=False)
    return describe_plan(plan, model, train_size=train_size)


def describe_plan(
    plan: Plan, model: TransferModel, *, train_size: int | None = None
) -> list[dict[str, Any]]:
    """Per stage: what trains at which rate, parameter counts, passes over the training items
    per epoch and optimizer steps, and the recipe:
    augmentation, the weight average's decay (`ema`), and on the last stage the test-time
    views the final validation averages (`tta`)."""
    # A strategy's added modules sit inside backbone groups: they count in their own group.
    added = {id(p) for _, modules in model.added_groups for m in modules for p in m.parameters()}
    group_sizes = {
        name: sum(
            p.numel()
            for module in modules
            for p in module.parameters()
            if id(p) not in added or name in dict(model.added_groups)
        )
        for name, modules in model.groups()
    }
    total = sum(group_sizes.values())
    recipes = stage_recipes(plan)
    described = []
    for stage, recipe in zip(plan.stages, recipes, strict=True):
        trainable: list[dict[str, Any]] = [
            {
                "name": name,
                # Unknown until the learning-rate finder has run (`lr: auto`).
                "lr": None if stage.auto_lr else stage.group_lrs[name],
                "parameters": group_sizes[name],
            }
            for name in stage.trainable_groups
        ]
        described.append(
            {
                "name": stage.name,
                "trainable_groups": trainable,
                "trainable_parameters": sum(group_sizes[name] for name in stage.trainable_groups),
                "total_parameters": total,
                **modality_for(plan.modality).stage_inputs(plan, stage),
                "epochs": stage.epochs,
                "schedule": stage.schedule,
                "bn_mode": stage.bn_mode,
                "cache_features": stage.cache_features,
                **recipe,
                "steps": (
                    None
                    if train_size is None
                    else steps_per_epoch(plan, stage, train_size) * stage.epochs
                ),
            }
        )
    return described
