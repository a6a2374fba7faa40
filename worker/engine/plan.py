"""Turn a user's transfer-learning request into an explicit, serialisable training plan.

A plan is a list of stages; each says which parameter groups train, at which learning rate,
for how many epochs, and how BatchNorm behaves. The training loop only executes plans, so
what will happen can be shown (`describe_plan`) before anything runs.
"""

import math
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch

from .zoo import get_base_model_info

if TYPE_CHECKING:
    from .model import TransferModel

Strategy = Literal["feature_extraction", "fine_tune", "freeze_unfreeze"]
Schedule = Literal["constant", "cosine"]
BatchNormMode = Literal["train", "frozen"]
OptimizerName = Literal["adamw", "sgd"]

HEAD = "head"
MIN_IMAGE_SIZE = 64
MAX_IMAGE_SIZE = 1024


@dataclass(frozen=True)
class HeadConfig:
    """Classifier on the pooled features: `hidden` Linear+ReLU layers, then a final Linear.

    `dropout` is applied to the input of every Linear layer.
    """

    hidden: tuple[int, ...] = ()
    dropout: float = 0.0


@dataclass(frozen=True)
class TransferConfig:
    """What a user asks for.

    Learning rates: `lr` is the head's rate while the backbone is frozen. Whenever backbone
    groups train (`fine_tune`, and the second stage of `freeze_unfreeze`, as in fastai's
    `fine_tune`), the head gets `lr * fine_tune_lr_factor` and each group below it that rate
    divided by `lr_decay` once more per step down (discriminative rates, ULMFiT's 2.6, about
    two orders of magnitude over a ResNet). fastai halves its base rate after unfreezing, but
    its base rate is meant for the whole network; thaw's `lr` is usually set for the head on
    frozen features, which tolerates about ten times more, hence the default factor of 0.1.

    `bn_mode` applies to stages that train backbone groups; stages with a frozen backbone
    always freeze BatchNorm. "frozen" keeps the ImageNet running statistics (the affine
    parameters still train): the head then keeps seeing features normalised the way it was
    trained on in a head-only stage, and small batches of a shifted domain cannot disturb the
    statistics. This is the recommended setting for small datasets (Keras' transfer-learning
    guide does the same). "train" uses batch statistics, as for training from scratch
    (`pretrained=False`) or with large datasets and batches.

    `epochs` counts all epochs; for `freeze_unfreeze`, `head_epochs` of them (default 1)
    train the head alone before the whole network is unfrozen.

    `early_stopping_patience`: end a stage when the val loss has not improved for this many
    epochs, and keep the weights with the lowest val loss (see `train.run`).
    """

    base_model: str
    strategy: Strategy
    num_classes: int
    head: HeadConfig = HeadConfig()
    epochs: int = 6
    batch_size: int = 32
    lr: float = 1e-3
    image_size: int | None = None
    seed: int = 0
    optimizer: OptimizerName = "adamw"
    weight_decay: float = 0.01
    label_smoothing: float = 0.0
    schedule: Schedule = "cosine"
    lr_decay: float = 2.6
    head_epochs: int | None = None
    fine_tune_lr_factor: float = 0.1
    bn_mode: BatchNormMode = "frozen"
    pretrained: bool = True
    early_stopping_patience: int | None = None
    device: str = "cpu"


@dataclass(frozen=True)
class Stage:
    name: str
    trainable_groups: tuple[str, ...]
    group_lrs: dict[str, float]
    epochs: int
    schedule: Schedule
    bn_mode: BatchNormMode
    image_size: int
    cache_features: bool
    """True when no backbone group trains, so backbone features can be computed once."""


@dataclass(frozen=True)
class Plan:
    base_model: str
    num_classes: int
    head: HeadConfig
    stages: tuple[Stage, ...]
    seed: int
    batch_size: int
    optimizer: OptimizerName
    weight_decay: float
    label_smoothing: float
    pretrained: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    early_stopping_patience: int | None = None
    device: str = "cpu"

    @property
    def image_size(self) -> int:
        """The size the finished model was last trained at, hence the one to predict at."""
        return self.stages[-1].image_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        return cls(
            base_model=data["base_model"],
            num_classes=data["num_classes"],
            head=HeadConfig(hidden=tuple(data["head"]["hidden"]), dropout=data["head"]["dropout"]),
            stages=tuple(
                Stage(
                    name=stage["name"],
                    trainable_groups=tuple(stage["trainable_groups"]),
                    group_lrs=dict(stage["group_lrs"]),
                    epochs=stage["epochs"],
                    schedule=stage["schedule"],
                    bn_mode=stage["bn_mode"],
                    image_size=stage["image_size"],
                    cache_features=stage["cache_features"],
                )
                for stage in data["stages"]
            ),
            seed=data["seed"],
            batch_size=data["batch_size"],
            optimizer=data["optimizer"],
            weight_decay=data["weight_decay"],
            label_smoothing=data["label_smoothing"],
            pretrained=data["pretrained"],
            mean=_triple(data["mean"]),
            std=_triple(data["std"]),
            early_stopping_patience=data["early_stopping_patience"],
            device=data["device"],
        )


def _triple(values: list[float]) -> tuple[float, float, float]:
    first, second, third = values
    return (first, second, third)


def _check_choice(field_name: str, value: object, literal: Any) -> None:
    choices = get_args(literal)
    if value not in choices:
        raise ValueError(f"{field_name} must be one of {', '.join(choices)}; got {value!r}")


def _validate(config: TransferConfig) -> None:
    _check_choice("strategy", config.strategy, Strategy)
    _check_choice("schedule", config.schedule, Schedule)
    _check_choice("optimizer", config.optimizer, OptimizerName)
    _check_choice("bn_mode", config.bn_mode, BatchNormMode)
    checks = [
        (config.num_classes >= 2, f"num_classes must be at least 2; got {config.num_classes}"),
        (config.epochs >= 1, f"epochs must be at least 1; got {config.epochs}"),
        (config.batch_size >= 1, f"batch_size must be at least 1; got {config.batch_size}"),
        (config.lr > 0, f"lr must be positive; got {config.lr}"),
        (config.weight_decay >= 0, f"weight_decay must be >= 0; got {config.weight_decay}"),
        (
            0 <= config.label_smoothing < 1,
            f"label_smoothing must be in [0, 1); got {config.label_smoothing}",
        ),
        (config.lr_decay >= 1, f"lr_decay must be >= 1; got {config.lr_decay}"),
        (
            config.fine_tune_lr_factor > 0,
            f"fine_tune_lr_factor must be positive; got {config.fine_tune_lr_factor}",
        ),
        (
            0 <= config.head.dropout < 1,
            f"head dropout must be in [0, 1); got {config.head.dropout}",
        ),
        (
            all(width >= 1 for width in config.head.hidden),
            f"head hidden widths must be positive; got {config.head.hidden}",
        ),
        (
            config.image_size is None or MIN_IMAGE_SIZE <= config.image_size <= MAX_IMAGE_SIZE,
            f"image_size must be between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE}; "
            f"got {config.image_size}",
        ),
        (
            config.early_stopping_patience is None or config.early_stopping_patience >= 1,
            f"early_stopping_patience must be at least 1; got {config.early_stopping_patience}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    if config.head_epochs is not None and config.strategy != "freeze_unfreeze":
        raise ValueError("head_epochs only applies to the freeze_unfreeze strategy")
    if config.strategy == "freeze_unfreeze":
        if config.epochs < 2:
            raise ValueError("freeze_unfreeze needs epochs >= 2 (head epochs, then the rest)")
        head_epochs = config.head_epochs if config.head_epochs is not None else 1
        if not 1 <= head_epochs < config.epochs:
            raise ValueError(
                f"head_epochs must be between 1 and epochs - 1 = {config.epochs - 1}; "
                f"got {head_epochs}"
            )
    try:
        torch.device(config.device)
    except RuntimeError as error:
        raise ValueError(f"invalid device {config.device!r}: {error}") from None


def _discriminative_lrs(top_lr: float, groups: tuple[str, ...], decay: float) -> dict[str, float]:
    """The last group gets `top_lr`; each group below it gets `decay` times less."""
    depth = len(groups) - 1
    return {name: top_lr / decay ** (depth - index) for index, name in enumerate(groups)}


def compile_plan(config: TransferConfig) -> Plan:
    """Validate `config` and expand its strategy into stages; raises ValueError when invalid."""
    info = get_base_model_info(config.base_model)
    _validate(config)
    image_size = config.image_size or info.input_size
    groups = (*info.group_names, HEAD)
    head_only = Stage(
        name=HEAD,
        trainable_groups=(HEAD,),
        group_lrs={HEAD: config.lr},
        epochs=config.epochs,
        schedule=config.schedule,
        bn_mode="frozen",
        image_size=image_size,
        cache_features=True,
    )
    whole = Stage(
        name=config.strategy,
        trainable_groups=groups,
        group_lrs=_discriminative_lrs(
            config.lr * config.fine_tune_lr_factor, groups, config.lr_decay
        ),
        epochs=config.epochs,
        schedule=config.schedule,
        bn_mode=config.bn_mode,
        image_size=image_size,
        cache_features=False,
    )
    stages: tuple[Stage, ...]
    if config.strategy == "feature_extraction":
        stages = (head_only,)
    elif config.strategy == "fine_tune":
        stages = (whole,)
    else:
        head_epochs = config.head_epochs if config.head_epochs is not None else 1
        stages = (
            replace(head_only, epochs=head_epochs),
            replace(whole, name="unfreeze", epochs=config.epochs - head_epochs),
        )
    return Plan(
        base_model=config.base_model,
        num_classes=config.num_classes,
        head=config.head,
        stages=stages,
        seed=config.seed,
        batch_size=config.batch_size,
        optimizer=config.optimizer,
        weight_decay=config.weight_decay,
        label_smoothing=config.label_smoothing,
        pretrained=config.pretrained,
        mean=info.mean,
        std=info.std,
        early_stopping_patience=config.early_stopping_patience,
        device=config.device,
    )


def steps_per_epoch(plan: Plan, train_size: int) -> int:
    return math.ceil(train_size / plan.batch_size)


def describe_plan(
    plan: Plan, model: "TransferModel", *, train_size: int | None = None
) -> list[dict[str, Any]]:
    """Per stage: what trains at which rate, parameter counts, and optimizer steps."""
    group_sizes = {
        name: sum(p.numel() for module in modules for p in module.parameters())
        for name, modules in model.groups()
    }
    total = sum(group_sizes.values())
    described = []
    for stage in plan.stages:
        trainable: list[dict[str, Any]] = [
            {"name": name, "lr": stage.group_lrs[name], "parameters": group_sizes[name]}
            for name in stage.trainable_groups
        ]
        described.append(
            {
                "name": stage.name,
                "trainable_groups": trainable,
                "trainable_parameters": sum(group_sizes[name] for name in stage.trainable_groups),
                "total_parameters": total,
                "image_size": stage.image_size,
                "epochs": stage.epochs,
                "schedule": stage.schedule,
                "bn_mode": stage.bn_mode,
                "cache_features": stage.cache_features,
                "steps": (
                    None if train_size is None else steps_per_epoch(plan, train_size) * stage.epochs
                ),
            }
        )
    return described
