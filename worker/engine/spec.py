"""The transfer settings a user writes, declared once.

Every setting is a dataclass field made by `setting(...)`: its type, default, bounds and
description live there and nowhere else. From this one declaration come:
- the HTTP schema: `service/jobs/schemas.py` builds its pydantic models from these classes;
- the engine's config: `TransferConfig` (plan.py) extends `TransferSettings`;
- the plan's serialised form: `Plan` carries `RunSettings` verbatim, and `decode` fills what a
  stored plan lacks with these defaults;
- the engine's own checks: `check_settings` enforces the same bounds for notebook callers.

Standard library only, so the API process validates JSON with it without importing torch.
"""

import re
import types
import typing
from collections.abc import Iterator
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass
from typing import Any, Literal, TypeVar, get_args, get_origin

Strategy = Literal[
    "feature_extraction",
    "fine_tune",
    "partial",
    "freeze_unfreeze",
    "gradual_unfreeze",
    "lwf",
    "scratch",
    "ulmfit",
    "lora",
]
Schedule = Literal["constant", "cosine", "one_cycle", "slanted_triangular"]
BatchNormMode = Literal["train", "frozen"]
OptimizerName = Literal["adamw", "sgd"]
Device = Literal["cpu", "cuda"]
Truncation = Literal["head", "head_tail"]
ClassWeights = Literal["none", "balanced"]
SamplerName = Literal["shuffle", "balanced"]
AugmentLevel = Literal["none", "light", "standard", "strong"]
TtaMode = Literal["none", "flip", "flip_crops"]
AUTO = "auto"
AutoRate = Literal["auto"]

MIN_IMAGE_SIZE = 64
MAX_IMAGE_SIZE = 1024
MAX_LR = 10.0
MAX_EPOCHS = 1000
MAX_GPUS = 8
"""The most processes one job trains on: the GPUs of one host."""
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,99}$"
ALL = "all"
IMAGE_SIZE_RANGE = f" must be between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE}"
MIN_MAX_LENGTH = 8
MAX_MAX_LENGTH = 4096


class SpecError(ValueError):
    """A transfer setting the engine refuses. `field` names it as a spec writes it
    (`head_epochs`, `stages[1].groups`), so the API points its 422 at it without reading the
    message."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class ModalityDefaults:
    """What a setting left out of a spec becomes, per modality of the base model: each
    `Modality` declares its own (`Modality.defaults`)."""

    lr: float
    """The head's rate while the backbone is frozen."""
    fine_tune_lr_factor: float
    lr_decay: float
    max_length: int | None = None
    """Tokens per text (capped at the base model's own maximum)."""
    batch_size: int = 32


ULMFIT_LR_DECAY = 2.6
ULMFIT_LM_LR = 1e-4
"""ulmfit: the masked-LM stage's rate (the encoder's top layer; ÷ lr_decay per layer below)."""
DATA_RICH_PER_CLASS = 80
"""Image training splits with at least this many items per class get light augmentation and
label smoothing 0.1 by default: a careful script gained from them at 100 per class, while they
cost accuracy at 5 per class and at 68 (tests/test_e2e.py's digits: 0.67 against 0.90). 80 is
the training split of 100 labelled images per class at the default 20 % validation."""
REFIT_MAX_TRAIN_ITEMS = 5000
"""Plans whose training split has at most this many items refit by default: the validation
split holds a fifth of the labels, worth points on small sets (bench/text_quality.py,
bench/quality.py), while one more run of a small set costs minutes."""
FEW_SHOT_HEAD_STEPS = 50
"""The fewest optimizer steps a stage on cached features takes over all its epochs, by making
several passes over a small training split per epoch. A one-epoch head stage on few-shot data
would otherwise take a handful (5 shots x 10 classes in batches of 32: 2 steps) and leave the
head barely trained, while steps on cached features cost almost nothing."""

HEAD_C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
"""A solved head's L2 strengths, as scikit-learn's C (the optimum at each is fitted, and the
one with the best cross-validated accuracy kept; see `linear_probe.py`)."""
HEAD_CV_MAX_ITEMS = 5000
"""Above this many labelled items one validation split is a reliable judge of a solved head's
strength, and k more solves per strength would cost more than they tell: the strength is
chosen on the split."""

_SETTING = "thaw.setting"


@dataclass(frozen=True)
class Bounds:
    """Limits on a value (numbers), its length (strings, lists) or its text (a pattern)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    min_length: int | None = None
    max_length: int | None = None
    pattern: str | None = None
    message: str | None = None
    """What follows the field's name in the error when a bound is broken, if not the default
    (`epochs must be at least 1`, `lr_decay must be >= 1`)."""


@dataclass(frozen=True)
class Setting:
    description: str | None
    bounds: Bounds
    items: Bounds | None
    """Bounds on each element of a list, or each value of a mapping."""
    public: bool
    """False for engine-only knobs that the HTTP spec does not offer."""


def setting(
    default: Any = MISSING,
    *,
    description: str | None = None,
    items: Bounds | None = None,
    public: bool = True,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    min_length: int | None = None,
    max_length: int | None = None,
    pattern: str | None = None,
    message: str | None = None,
) -> Any:
    bounds = Bounds(ge, gt, le, lt, min_length, max_length, pattern, message)
    metadata = {_SETTING: Setting(description, bounds, items, public)}
    return field(default=default, metadata=metadata)


def settings_of(cls: type) -> Iterator[tuple[Field[Any], Setting]]:
    """The declared settings of a settings class, in declaration order (inherited first)."""
    for item in fields(cls):
        declared = item.metadata.get(_SETTING)
        if declared is not None:
            yield item, declared


@dataclass(frozen=True, kw_only=True)
class HeadConfig:
    """Classifier on the pooled features: `hidden` Linear+ReLU layers, then a final Linear.

    `dropout` is applied to the input of every Linear layer.
    """

    hidden: tuple[int, ...] = setting(
        (),
        max_length=4,
        items=Bounds(ge=1, le=8192),
        description="Sizes of hidden fully-connected layers before the classifier.",
    )
    dropout: float = setting(0.0, ge=0.0, lt=1.0)


@dataclass(frozen=True, kw_only=True)
class StageSpec:
    """One stage written out by the user instead of a preset; unset fields follow the spec.

    `groups`: group names, or "head", "all", or "top:<k>" (the top k backbone groups and the
    head). `lr` is the rate of the top trainable group; each group below gets `lr_decay`
    (the config's unless given) times less. `lrs` sets every trainable group's rate instead.
    Without either rate, a head-only stage trains at `config.lr` and others at
    `config.lr * fine_tune_lr_factor`.
    """

    groups: tuple[str, ...] = setting(
        (ALL,),
        min_length=1,
        message=": list at least one group",
        description="Layer group names (see the base model's groups), or `head`, `all`, "
        "or `top:<k>` (the top k backbone groups and the head).",
    )
    epochs: int = setting(1, ge=1, le=MAX_EPOCHS)
    lr: float | None = setting(
        None, gt=0.0, le=MAX_LR, description="Rate of the top group; lower ones ÷ lr_decay."
    )
    lrs: dict[str, float] | None = setting(
        None,
        items=Bounds(gt=0.0, le=MAX_LR),
        description="A rate for every trainable group instead of `lr`.",
    )
    lr_decay: float | None = setting(None, ge=1.0, le=100.0)
    schedule: Schedule | None = setting(None)
    bn_mode: BatchNormMode | None = setting(None)
    image_size: int | None = setting(
        None, ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE, message=IMAGE_SIZE_RANGE
    )
    name: str | None = setting(None, max_length=50)


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """Settings a plan carries unchanged from the request into training."""

    seed: int = setting(0, ge=0, le=2**31 - 1)
    batch_size: int | None = setting(
        None,
        ge=1,
        le=4096,
        description="Default: 32 for image base models, 16 for text.",
    )
    optimizer: OptimizerName = setting("adamw")
    weight_decay: float = setting(0.01, ge=0.0, le=1.0)
    label_smoothing: float | None = setting(
        None,
        ge=0.0,
        lt=1.0,
        description="Default: 0.1 for image models trained on at least "
        f"{DATA_RICH_PER_CLASS} images per class, else 0 (see the plan's `extra.defaults`).",
    )
    class_weights: ClassWeights = setting(
        "none",
        description="`balanced` weighs each class's loss by n_samples / (n_classes * "
        "n_class_samples) of the training split, so rare classes count as much as common ones.",
    )
    sampler: SamplerName = setting(
        "shuffle",
        description="`balanced` draws each epoch's training samples (with replacement) so that "
        "every class is drawn equally often; `shuffle` visits every sample once per epoch.",
    )
    early_stopping_patience: int | None = setting(
        None,
        ge=1,
        le=MAX_EPOCHS,
        description="End a stage when the val loss has not improved for this many epochs, "
        "and keep the weights with the lowest val loss.",
    )
    augment: AugmentLevel | None = setting(
        None,
        description="Image models: `light` random resized "
        "crop and horizontal flip; `standard` adds TrivialAugmentWide; `strong` adds random "
        "erasing and MixUp/CutMix. Default: `light` when the training split has at least "
        f"{DATA_RICH_PER_CLASS} images per class, `none` below (augmentation hurt at 5 per "
        "class); the preview's plan says which under `extra.defaults`. Text models: must be "
        "left out or `none`.",
    )
    flip: bool = setting(
        True,
        description="Include the horizontal flip in `augment`; false where mirroring changes "
        "the class (digits, text in images).",
    )
    tta: TtaMode | None = setting(
        None,
        description="Image models: test-time augmentation, used by the final validation and by "
        "predict alike: `flip` averages the probabilities of the image and its mirror; "
        "`flip_crops` adds five crops at the trained size (centre, corners) of the image "
        "enlarged 8/7, each with its mirror (12 views). `flip: false` leaves the mirrored "
        "views out. Default: `flip` when the last stage trains on mirrored images (`augment` "
        "other than `none`, `flip` true), else `none`; the preview's plan says which under "
        "`extra.defaults`. The version's metrics record validation accuracy with and without "
        "it.",
    )
    ema: float | None = setting(
        None,
        gt=0.0,
        lt=1.0,
        description="Keep an exponential moving average of the weights with this decay per "
        "step (e.g. 0.99; warmed up as min(decay, (1 + n) / (10 + n)) over a stage's n steps); "
        "validation, early stopping and the exported model use the averaged weights.",
    )
    feature_views: int = setting(
        4,
        ge=1,
        le=32,
        description="Image models with `augment`: stages on cached backbone features (the "
        "frozen-backbone head stage) compute this many augmented views of each training "
        "image once, and train on one of them per image each pass over the features: one "
        "backbone pass per image and view, not per epoch. MixUp/CutMix are not applied to "
        "cached features.",
    )
    device: Device = setting("cpu", description="`cuda` sends the job to the `gpu` queue.")
    gpus: int = setting(
        1,
        ge=1,
        le=MAX_GPUS,
        description="Train on this many GPUs of one worker host (DistributedDataParallel): "
        "each takes batch_size / gpus samples of every batch, so batch_size must be a multiple "
        "of gpus. With `device: cpu`, that many CPU processes (gloo), which mostly serves tests.",
    )
    lwf_temperature: float = setting(2.0, gt=0.0, le=100.0)
    lwf_lambda: float = setting(
        1.0, ge=0.0, le=100.0, description="lwf: weight of the distillation loss."
    )
    amp: bool = setting(
        True, description="On CUDA: bf16 autocast (fp16 with loss scaling on older GPUs)."
    )
    amp_cpu: bool = setting(False, public=False)
    refit: bool | None = setting(
        None,
        description="Once the run has chosen its recipe on the validation split (the epochs "
        "early stopping kept, a solved head's L2 strength, the calibration), train once more "
        "on the training and validation items together with that recipe and publish that "
        "model (AutoGluon's refit_full). Its validation metrics stay those of the run that "
        "chose the recipe; the model card says so. Costs about one more run. Default: on "
        f"when the training split has at most {REFIT_MAX_TRAIN_ITEMS} items (where the "
        "validation split's labels are worth most and one more run costs least), else off "
        "(see the plan's `extra.defaults`).",
    )


@dataclass(frozen=True, kw_only=True)
class TransferSettings(RunSettings):
    """What a user asks for (see `TransferConfig` for how the rates and stages follow)."""

    base_model: str = setting(
        "efficientnet_lite0",
        max_length=300,
        description="A name from the zoo (GET /v1/base-models), or `model:<name>:<version or "
        "alias>` to start from one of your registered models (chained transfer; required "
        "by `lwf`).",
    )
    strategy: Strategy = setting("freeze_unfreeze", description="A preset; see the README's table.")
    head: HeadConfig = setting(HeadConfig())
    epochs: int = setting(6, ge=1, le=MAX_EPOCHS)
    lr: float | AutoRate | None = setting(
        None,
        gt=0.0,
        le=MAX_LR,
        description="The head's rate while the backbone is frozen, and `scratch`'s for every "
        "layer. Default: 0.001 for image base models, 0.002 for text (`scratch` on text: "
        "0.0005). `auto`: the worker first runs the learning-rate finder "
        "(as `POST /v1/jobs/lr-find`) on the first stage and trains at its suggestion; the "
        "groups' rates keep their ratios, and the plan records the rate chosen.",
    )
    image_size: int | None = setting(
        None,
        ge=MIN_IMAGE_SIZE,
        le=MAX_IMAGE_SIZE,
        message=IMAGE_SIZE_RANGE,
        description="Default: the base model's input size.",
    )
    schedule: Schedule | None = setting(
        None,
        description="The rate schedule of the preset's stages (`gradual_unfreeze` and `ulmfit` "
        "always use `slanted_triangular`). Default: `cosine`, except on text base models "
        "`one_cycle` for `scratch` and `slanted_triangular` (a 10 % warm-up) for `fine_tune`.",
    )
    lr_decay: float | None = setting(
        None,
        ge=1.0,
        le=100.0,
        description="Discriminative rate: each lower group ÷ this. Default: 2.6 for image base "
        "models and ulmfit, 1.2 for other text strategies.",
    )
    fine_tune_lr_factor: float | None = setting(
        None,
        gt=0.0,
        le=1.0,
        description="Once the backbone trains, the head's rate is lr * this (then ÷ lr_decay "
        "per lower group). Default: 0.1 for image base models, 0.05 for text.",
    )
    bn_mode: BatchNormMode = setting(
        "frozen",
        description="BatchNorm in stages that train the backbone: `frozen` keeps the "
        "pretrained running statistics (best for small datasets), `train` updates them.",
    )
    head_epochs: int | None = setting(
        None,
        ge=1,
        le=MAX_EPOCHS,
        description="freeze_unfreeze and lwf: epochs of the head-only stage. Default 1, "
        "which a linear head spends solved (`solve_head`); more than 1 steps the head for that "
        "many epochs (on cached backbone features; it makes at least "
        f"{FEW_SHOT_HEAD_STEPS} optimizer steps in all, with several passes over a small "
        "training split per epoch).",
    )
    solve_head: bool = setting(
        True,
        description="Head-only stages of the presets on a linear head (`feature_extraction`; "
        "the first stage of `freeze_unfreeze`, `gradual_unfreeze`, `ulmfit` and `lwf`) are "
        "solved, not stepped: multinomial logistic regression on the frozen features, fitted "
        "to its optimum by full-batch L-BFGS with the L2 strength chosen for accuracy by "
        f"5-fold cross-validation over the labelled items from C in {list(HEAD_C_GRID)}. "
        "Such a stage takes one epoch; `head_epochs` > 1 asks for a "
        "stepped head instead. false: the optimizer steps it for its epochs like any other "
        "stage.",
    )
    partial_groups: int = setting(
        2, ge=1, le=100, description="partial: how many top backbone groups train."
    )
    stages: tuple[StageSpec, ...] | None = setting(
        None,
        max_length=50,
        description="Explicit stages instead of the preset's (then `epochs` is their sum). "
        "A stage where no backbone group trains runs on cached features and, as the presets' "
        f"head stages, makes at least {FEW_SHOT_HEAD_STEPS} optimizer steps in all.",
    )
    progressive_resizing: tuple[int, ...] | None = setting(
        None,
        max_length=8,
        items=Bounds(ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE, message=IMAGE_SIZE_RANGE),
        description="Increasing image sizes a stage's epochs move through, ending at the final "
        "size, e.g. [96, 128, 160].",
    )
    task_name: str | None = setting(
        None,
        pattern=NAME_PATTERN,
        description="Name of the task this model learns (default: the model's name); an `lwf` "
        "model answers it beside its parent's tasks.",
    )
    pretrained: bool = setting(True, description="Start from the zoo's pretrained weights.")
    max_length: int | None = setting(
        None,
        ge=MIN_MAX_LENGTH,
        le=MAX_MAX_LENGTH,
        description="Text base models: tokens per text, special tokens included (default 128, "
        "at most the base model's maximum). Images: must be left out.",
    )
    truncation: Truncation | None = setting(
        None,
        description="Text base models: what a longer text keeps: `head` (default; its first "
        "tokens) or `head_tail` (its first quarter and last three quarters of the budget, as "
        "Sun et al. 2019 found best). Images: must be left out.",
    )
    lm_epochs: int | None = setting(
        None,
        ge=0,
        le=MAX_EPOCHS,
        description="ulmfit: epochs of the masked-LM stage on the dataset's texts before the "
        "classifier (default 0: the stage did not pay on labelled sets of a few hundred "
        "texts; 1 or more adds it). Not counted in `epochs`.",
    )
    lm_lr: float | None = setting(
        None,
        gt=0.0,
        le=MAX_LR,
        description="ulmfit: the masked-LM stage's top rate (default 1e-4; ÷ lr_decay per layer).",
    )
    lora_rank: int | None = setting(
        None,
        ge=1,
        le=256,
        description="lora: the rank of each adapter (default: the base model family's, 8 or 4 "
        "for EfficientNet and MobileNet).",
    )
    lora_alpha: float | None = setting(
        None,
        gt=0.0,
        le=4096.0,
        description="lora: the adapters' scale is lora_alpha / lora_rank (default 2 * rank).",
    )
    lora_dropout: float | None = setting(
        None, ge=0.0, lt=1.0, description="lora: dropout on each adapter's input (default 0)."
    )
    lora_targets: tuple[str, ...] | None = setting(
        None,
        min_length=1,
        max_length=64,
        items=Bounds(min_length=1, max_length=200),
        description="lora: the modules adapted, as module-name suffixes (`query`, "
        "`blocks.3.0.conv_pwl`) or `pointwise` (every 1x1 convolution that narrows the "
        "channels). Default: the base model family's (attention projections for BERT-family "
        "and ViT, pointwise convolutions for EfficientNet and MobileNet).",
    )


def check_settings(value: Any, where: str = "") -> None:
    """Raise ValueError, naming the field (`stages[0].epochs …`), where a bound is broken."""
    for item, declared in settings_of(type(value)):
        name = f"{where}{item.name}"
        current = getattr(value, item.name)
        if current is None:
            continue
        _check_choice(name, current, item.type)
        _check_bounds(name, current, declared.bounds)
        members: list[tuple[str, Any]] = []
        if isinstance(current, tuple):
            members = [(f"{name}[{index}]", member) for index, member in enumerate(current)]
        elif isinstance(current, dict):
            members = [(f"{name}[{key!r}]", member) for key, member in current.items()]
        for member_name, member in members:
            if declared.items is not None:
                _check_bounds(member_name, member, declared.items)
            if is_dataclass(member):
                check_settings(member, f"{member_name}.")
        if is_dataclass(current):
            check_settings(current, f"{name}.")


def _check_choice(name: str, value: Any, annotation: Any) -> None:
    choices = _literal_choices(annotation)
    if choices and value not in choices and not _is_admitted_number(value, annotation):
        raise SpecError(
            name, f"invalid {name} {value!r}: {name} must be one of {', '.join(map(str, choices))}"
        )


def _is_admitted_number(value: Any, annotation: Any) -> bool:
    """A number where the setting takes a number or a word (`lr`: a rate or `auto`)."""
    numbers = (int, float)
    return (
        isinstance(value, numbers)
        and not isinstance(value, bool)
        and _is_union(annotation)
        and any(arg in numbers for arg in get_args(annotation))
    )


def _literal_choices(annotation: Any) -> tuple[Any, ...]:
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    if _is_union(annotation):
        return tuple(c for arg in get_args(annotation) for c in _literal_choices(arg))
    return ()


def _check_bounds(name: str, value: Any, bounds: Bounds) -> None:
    broken = _broken_bound(value, bounds)
    if broken is not None:
        raise SpecError(name, f"{name}{bounds.message or broken}; got {value!r}")


def _broken_bound(value: Any, bounds: Bounds) -> str | None:
    """The default wording of the first bound `value` breaks, or None."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        # Counts read "at least 1"; rates and factors read ">= 1".
        at_least, at_most = ("at least", "at most") if isinstance(value, int) else (">=", "<=")
        checks = (
            (bounds.gt, lambda limit: value > limit, "positive" if bounds.gt == 0 else ">"),
            (bounds.ge, lambda limit: value >= limit, at_least),
            (bounds.lt, lambda limit: value < limit, "<"),
            (bounds.le, lambda limit: value <= limit, at_most),
        )
        for limit, holds, wording in checks:
            if limit is not None and not holds(limit):
                bound = "" if wording == "positive" else f" {limit:g}"
                return f" must be {wording}{bound}"
    if isinstance(value, str | tuple | dict):
        if bounds.min_length is not None and len(value) < bounds.min_length:
            return f" must have at least {bounds.min_length} item(s)"
        if bounds.max_length is not None and len(value) > bounds.max_length:
            return f" must have at most {bounds.max_length} item(s)"
    if isinstance(value, str) and bounds.pattern and not re.fullmatch(bounds.pattern, value):
        return f" must match {bounds.pattern}"
    return None


T = TypeVar("T")


def decode(cls: type[T], data: Any) -> T:
    """Build `cls` (a dataclass) from JSON-like data; fields the data lacks take their defaults.

    Lists become the declared tuples and nested dictionaries the declared dataclasses, so
    `decode(type(x), to_json(x)) == x` for every plan and config; values already of the
    declared type pass through.
    """
    return typing.cast(T, _decode(cls, data))


def _decode(annotation: Any, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(annotation, type) and is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        hints = typing.get_type_hints(annotation)
        known = {item.name for item in fields(annotation)}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(sorted(unknown))}")
        return annotation(**{name: _decode(hints[name], v) for name, v in value.items()})
    origin, args = get_origin(annotation), get_args(annotation)
    if _is_union(annotation):
        members = [arg for arg in args if arg is not type(None)]
        if len(members) > 1:
            # A number or a word (`lr`: a rate or "auto"): a word passes as it is.
            words = [arg for arg in members if get_origin(arg) is Literal]
            if isinstance(value, str) and words:
                return value
            members = [arg for arg in members if get_origin(arg) is not Literal]
        (inner,) = members
        return _decode(inner, value)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], member) for member in value)
        return tuple(_decode(arg, member) for arg, member in zip(args, value, strict=True))
    if origin is dict:
        return {key: _decode(args[1], member) for key, member in value.items()}
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _is_union(annotation: Any) -> bool:
    return get_origin(annotation) in (typing.Union, types.UnionType)
