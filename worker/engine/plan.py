"""Turn a user's transfer-learning request into an explicit, serialisable training plan.

A plan is a list of stages; each says which parameter groups train, at which learning rate,
for how many epochs, with which schedule, at which image size, and how BatchNorm behaves.
Every preset compiles to stages, and so do stages a user writes out. The training loop only
executes plans, so what will happen can be shown (`describe_plan`) before anything runs.
"""

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .artifacts import ModelConfig, ModelConfigError, read_model_config
from .preset_defaults import DEFAULT_SCHEDULE, applied_defaults, default_lr, preset_defaults
from .spec import (
    ALL,
    AUTO,
    FEW_SHOT_HEAD_STEPS,
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    MODALITY_DEFAULTS,
    ULMFIT_LM_LR,
    ULMFIT_LR_DECAY,
    BatchNormMode,
    HeadConfig,
    Modality,
    RunSettings,
    Schedule,
    StageSpec,
    TransferSettings,
    Truncation,
    check_settings,
    decode,
)
from .zoo import get_base_model_info

HEAD = "head"
OLD_HEADS = "old_heads"
"""The group holding a parent's heads in an LwF model (the tasks it must not forget)."""
TOP = "top:"
DEFAULT_TASK = "main"
LM_HEAD = "lm_head"
"""ulmfit: the group of the masked-LM head, present only in a model whose plan has an LM stage."""
CLASSIFY = "classify"
MASKED_LM = "masked_lm"
"""A stage's objective: the new task's classes, or (ulmfit) masked tokens of the texts."""


@dataclass(frozen=True)
class ParentModel:
    """An exported thaw model to start from (chained transfer): how the plan names it, and its
    `config.json` as data, so that compiling a plan reads nothing.

    `location` is recorded in the plan as `Plan.parent` and never opened by the engine: the
    service names a version by its storage key, and whoever calls `run` hands it the files
    as a local folder (`parent_dir`)."""

    location: str
    config: ModelConfig

    @classmethod
    def from_folder(cls, folder: Path) -> "ParentModel":
        try:
            config = read_model_config(folder)
        except ModelConfigError as error:
            raise ValueError(f"parent_dir: {error}") from None
        return cls(location=str(folder), config=config)


@dataclass(frozen=True, kw_only=True)
class TransferConfig(TransferSettings):
    """What a user asks for (the settings of `TransferSettings`), for a dataset of
    `num_classes` classes, optionally starting from a `parent` model.

    Learning rates: `lr` is the head's rate while the backbone is frozen. Whenever backbone
    groups train (`fine_tune`, `partial`, and the later stages of `freeze_unfreeze`,
    `gradual_unfreeze` and `lwf`, as in fastai's `fine_tune`), the head gets
    `lr * fine_tune_lr_factor` and each group below it that rate divided by `lr_decay` once
    more per step down (discriminative rates, ULMFiT's 2.6, about two orders of magnitude
    over a ResNet). fastai halves its base rate after unfreezing, but its base rate is meant
    for the whole network; thaw's `lr` is usually set for the head on frozen features, which
    tolerates about ten times more, hence the default factor of 0.1. `scratch` trains every
    group at `lr`: nothing pretrained needs protecting.

    `bn_mode` applies to stages that train backbone groups; stages with a frozen backbone
    always freeze BatchNorm. "frozen" keeps the ImageNet running statistics (the affine
    parameters still train): the head then keeps seeing features normalised the way it was
    trained on in a head-only stage, and small batches of a shifted domain cannot disturb the
    statistics. This is the recommended setting for small datasets (Keras' transfer-learning
    guide does the same). "train" uses batch statistics, as for training from scratch
    (`scratch` always does) or with large datasets and batches.

    `epochs` counts all epochs; for `freeze_unfreeze` and `lwf`, `head_epochs` of them
    (default 1) train the new head alone first. `gradual_unfreeze` trains the head alone
    for one epoch, then unfreezes one more group per epoch from the top; epochs beyond the
    last group train everything. `partial` trains the top `partial_groups` backbone groups
    and the head. `stages`, when given, replaces the preset's stages (and `epochs`).

    `progressive_resizing`: increasing image sizes; each stage's epochs are split into
    consecutive sub-stages at these sizes, ending at the last, which is the final image size.

    `parent`: an exported thaw model to start from instead of ImageNet weights (chained
    transfer); its architecture replaces `base_model`'s. `lwf` needs one: its heads are kept
    and distilled (`lwf_temperature`, `lwf_lambda`) while a new head for `task_name` learns
    the new classes.

    `amp`: mixed precision on CUDA (bf16, or fp16 with loss scaling where bf16 is missing)
    with channels-last tensors. CPU runs stay exact fp32 unless `amp_cpu` asks for bf16.

    `early_stopping_patience`: end a stage when the val loss has not improved for this many
    epochs, and keep the weights with the lowest val loss (see `train.run`).

    `train_size`: how many training items the plan will train on. A stage on cached features
    (a preset's or one in `stages`) then makes several passes over them per epoch
    (`Stage.passes`), enough for `FEW_SHOT_HEAD_STEPS` steps in all; None: one pass.
    """

    num_classes: int
    parent: ParentModel | None = None
    train_size: int | None = None


@dataclass(frozen=True)
class Stage:
    name: str
    trainable_groups: tuple[str, ...]
    group_lrs: dict[str, float]
    epochs: int
    schedule: Schedule
    bn_mode: BatchNormMode
    image_size: int | None
    """None for text (see `Plan.max_length`)."""
    cache_features: bool
    """True when no backbone group trains, so backbone features can be computed once."""
    distill: bool = False
    """LwF: the old heads' outputs are kept close to the parent's by a distillation loss."""
    objective: str = CLASSIFY
    """`classify`, or `masked_lm` (ulmfit's language-model stage on the texts)."""
    auto_lr: bool = False
    """The rates follow the spec's `lr: auto` and await the learning-rate finder: `group_lrs`
    hold them for the modality's default rate, and `with_found_lr` scales them at run time."""
    passes: int = 1
    """Shuffled passes over the training items in each epoch; more than one only on cached
    features with few items (`cached_passes`), so an epoch still ends in one validation and
    one checkpoint."""


@dataclass(frozen=True)
class TaskInfo:
    """A task an LwF model keeps answering: its head's shape and its labels."""

    name: str
    labels: tuple[str, ...]
    head: HeadConfig


@dataclass(frozen=True, kw_only=True)
class Plan(RunSettings):
    """A compiled plan: the run settings as asked, plus everything resolved from the zoo,
    the preset and the parent. Its JSON form (`to_dict`) is stored with jobs and versions."""

    base_model: str
    num_classes: int
    head: HeadConfig
    stages: tuple[Stage, ...]
    pretrained: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    parent: str | None = None
    """Start from this exported model's weights instead of ImageNet's: its `ParentModel`
    location (the service's storage key of the version). `run` gets its files as a folder."""
    modality: Modality = "image"
    max_length: int | None = None
    """Text: tokens per text, special tokens included."""
    truncation: Truncation | None = None
    """Text: which tokens a longer text keeps."""
    task_name: str = DEFAULT_TASK
    old_tasks: tuple[TaskInfo, ...] = ()
    """LwF: the parent's tasks, whose heads are kept beside the new one."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes for people reading the plan (strategy name, parent reference)."""

    @property
    def image_size(self) -> int:
        """The size the finished model was last trained at, hence the one to predict at."""
        size = self.stages[-1].image_size
        if size is None:
            raise ValueError(f"a {self.modality} plan has no image size")
        return size

    @property
    def needs_lr_finder(self) -> bool:
        """The spec asked for `lr: auto` and no rate has been found for it yet."""
        return any(stage.auto_lr for stage in self.stages)

    @property
    def has_lm_stage(self) -> bool:
        return any(stage.objective == MASKED_LM for stage in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        """Inverse of `to_dict`; fields newer than the stored plan take their defaults."""
        # Exported models' config.json from before parents were named by key carry a host
        # path under `parent_dir`; a finished model never reads its parent again.
        data = {name: value for name, value in data.items() if name != "parent_dir"}
        return decode(cls, data)


def _validate(config: TransferConfig) -> None:
    check_settings(config)
    if config.num_classes < 2:
        raise ValueError(f"num_classes must be at least 2; got {config.num_classes}")
    sizes = config.progressive_resizing
    if sizes is not None and (not sizes or list(sizes) != sorted(set(sizes))):
        raise ValueError(
            f"progressive_resizing must be strictly increasing sizes between {MIN_IMAGE_SIZE} "
            f"and {MAX_IMAGE_SIZE}; got {sizes}"
        )
    if sizes is not None and config.image_size is not None and sizes[-1] != config.image_size:
        raise ValueError(
            f"progressive_resizing must end at image_size {config.image_size}; got {sizes}"
        )
    head_epoch_strategies = ("freeze_unfreeze", "lwf")
    if config.head_epochs is not None and config.strategy not in head_epoch_strategies:
        raise ValueError("head_epochs only applies to the freeze_unfreeze and lwf strategies")
    if config.strategy in head_epoch_strategies and config.stages is None:
        if config.epochs < 2:
            raise ValueError(f"{config.strategy} needs epochs >= 2 (head epochs, then the rest)")
        head_epochs = config.head_epochs if config.head_epochs is not None else 1
        if not 1 <= head_epochs < config.epochs:
            raise ValueError(
                f"head_epochs must be between 1 and epochs - 1 = {config.epochs - 1}; "
                f"got {head_epochs}"
            )
    if config.strategy == "lwf" and config.parent is None:
        raise ValueError("the lwf strategy needs parent_dir: the model whose task it keeps")
    if config.strategy == "scratch" and config.parent is not None:
        raise ValueError("the scratch strategy starts from random weights; drop parent_dir")
    if config.stages is not None and not config.stages:
        raise ValueError("stages must list at least one stage when given")
    if config.train_size is not None and config.train_size < 1:
        raise ValueError(f"train_size must be at least 1; got {config.train_size}")
    if config.batch_size % config.gpus:
        raise ValueError(
            f"gpus: batch_size {config.batch_size} does not split evenly over {config.gpus} "
            f"processes; choose a batch_size that is a multiple of {config.gpus}"
        )


def _discriminative_lrs(top_lr: float, groups: tuple[str, ...], decay: float) -> dict[str, float]:
    """The last group gets `top_lr`; each group below it gets `decay` times less.

    An LwF model's old heads sit beside the new head, not below it, so they share its rate.
    """
    ladder = tuple(group for group in groups if group != OLD_HEADS)
    depth = len(ladder) - 1
    rates = {name: top_lr / decay ** (depth - index) for index, name in enumerate(ladder)}
    if OLD_HEADS in groups:
        rates[OLD_HEADS] = top_lr
    return {name: rates[name] for name in groups}


@dataclass(frozen=True)
class _Base:
    """What the stages are built on: the architecture's groups, sizes and the parent, if any."""

    base_model: str
    backbone_groups: tuple[str, ...]
    image_size: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    parent_location: str | None
    old_tasks: tuple[TaskInfo, ...]
    modality: Modality = "image"
    max_length: int | None = None
    truncation: Truncation | None = None

    @property
    def head_groups(self) -> tuple[str, ...]:
        return (OLD_HEADS, HEAD) if self.old_tasks else (HEAD,)

    @property
    def all_groups(self) -> tuple[str, ...]:
        return (*self.backbone_groups, *self.head_groups)


def parent_tasks(config: ModelConfig) -> tuple[TaskInfo, ...]:
    """Every task an exported model answers, oldest first; its own head is the last."""
    return tuple(
        TaskInfo(name=task.name, labels=task.labels, head=decode(HeadConfig, task.head))
        for task in config.tasks
    )


def _check_modality_settings(config: TransferConfig, base_model: str, modality: str) -> None:
    """Settings of the other modality are refused, so a preview never shows one that is unused."""
    if modality == "text":
        for name in ("image_size", "progressive_resizing"):
            if getattr(config, name) is not None:
                raise ValueError(f"{name}: {base_model} is a text model; {name} is for images")
        if config.stages is not None:
            for index, spec in enumerate(config.stages):
                if spec.image_size is not None:
                    raise ValueError(
                        f"stages[{index}].image_size: {base_model} is a text model; "
                        "image_size is for images"
                    )
        if config.augment != "none":
            raise ValueError(f"augment: {base_model} is a text model; augment is for images")
        if config.tta != "none":
            raise ValueError(
                f"tta: {base_model} is a text model; test-time augmentation (flips, crops) "
                "is for images"
            )
        if config.sampler != "shuffle":
            raise ValueError(
                f"sampler: {base_model} is a text model, whose batches group texts by length; "
                "use class_weights for imbalanced classes"
            )
        return
    for name in ("max_length", "truncation", "lm_epochs", "lm_lr"):
        if getattr(config, name) is not None:
            raise ValueError(f"{name}: {base_model} is an image model; {name} is for text")
    if config.tta == "flip" and not config.flip:
        raise ValueError(
            "tta: `flip` with `flip: false` leaves only the original view; use `flip_crops` "
            "(crops without mirrors) or `none`"
        )
    if config.strategy == "ulmfit":
        raise ValueError(f"strategy: ulmfit is for text base models; {base_model} takes images")


def _text_length(config: TransferConfig, base_model: str, model_max: int) -> int:
    wanted = config.max_length or MODALITY_DEFAULTS["text"].max_length or model_max
    if config.max_length is not None and config.max_length > model_max:
        raise ValueError(
            f"max_length: {base_model} reads at most {model_max} tokens; got {config.max_length}"
        )
    return min(wanted, model_max)


def _resolve_base(config: TransferConfig) -> _Base:
    if config.parent is None:
        info = get_base_model_info(config.base_model)
        _check_modality_settings(config, config.base_model, info.modality)
        if info.modality == "text":
            assert info.max_length is not None
            return _Base(
                base_model=config.base_model,
                backbone_groups=info.group_names,
                image_size=None,
                mean=info.mean,
                std=info.std,
                parent_location=None,
                old_tasks=(),
                modality="text",
                max_length=_text_length(config, config.base_model, info.max_length),
                truncation=config.truncation or "head",
            )
        if info.fixed_input_size and config.image_size not in (None, info.input_size):
            raise ValueError(
                f"image_size: {config.base_model} only accepts {info.input_size}px images; "
                f"got {config.image_size}"
            )
        return _Base(
            base_model=config.base_model,
            backbone_groups=info.group_names,
            image_size=config.image_size or info.input_size,
            mean=info.mean,
            std=info.std,
            parent_location=None,
            old_tasks=(),
        )
    parent = config.parent.config
    parent_plan = Plan.from_dict(parent.plan)
    info = get_base_model_info(parent_plan.base_model)
    _check_modality_settings(config, parent_plan.base_model, parent_plan.modality)
    old_tasks = parent_tasks(parent) if config.strategy == "lwf" else ()
    clash = [task.name for task in old_tasks if task.name == _task_name(config)]
    if clash:
        raise ValueError(
            f"task_name: the parent already answers a task named {clash[0]!r}; "
            "give the new task another name"
        )
    if parent_plan.modality == "text":
        assert info.max_length is not None
        assert parent_plan.max_length is not None
        return _Base(
            base_model=parent_plan.base_model,
            backbone_groups=info.group_names,
            image_size=None,
            mean=parent_plan.mean,
            std=parent_plan.std,
            parent_location=config.parent.location,
            old_tasks=old_tasks,
            modality="text",
            max_length=(
                _text_length(config, parent_plan.base_model, info.max_length)
                if config.max_length is not None
                else parent_plan.max_length
            ),
            truncation=config.truncation or parent_plan.truncation or "head",
        )
    return _Base(
        base_model=parent_plan.base_model,
        backbone_groups=info.group_names,
        image_size=config.image_size or parent_plan.image_size,
        mean=parent_plan.mean,
        std=parent_plan.std,
        parent_location=config.parent.location,
        old_tasks=old_tasks,
    )


def _stage(
    config: TransferConfig,
    base: _Base,
    *,
    name: str,
    trainable: tuple[str, ...],
    epochs: int,
    top_lr: float | None = None,
    schedule: Schedule | None = None,
    lr_decay: float | None = None,
    bn_mode: BatchNormMode | None = None,
    objective: str = CLASSIFY,
    follows_lr: bool | None = None,
) -> Stage:
    """A stage with discriminative rates below `top_lr`, following the config's defaults.

    `follows_lr`: whether `top_lr` derives from the config's `lr` (default: when not given)."""
    cache = objective == CLASSIFY and not set(trainable) & set(base.backbone_groups)
    if follows_lr is None:
        follows_lr = top_lr is None
    boost = None
    if top_lr is None:
        head_lr, factor = _rates(config, base)
        top_lr = head_lr if cache else head_lr * factor
        boost = None if cache else preset_defaults(base.modality, config.strategy).head_boost
    group_lrs = _discriminative_lrs(
        top_lr, trainable, _lr_decay(config, base) if lr_decay is None else lr_decay
    )
    if boost is not None and HEAD in group_lrs:
        group_lrs[HEAD] *= boost
    return Stage(
        name=name,
        trainable_groups=trainable,
        group_lrs=group_lrs,
        epochs=epochs,
        schedule=schedule or config.schedule or _default_schedule(config, base),
        bn_mode="frozen" if cache else (bn_mode or config.bn_mode),
        image_size=base.image_size,
        cache_features=cache,
        # The old heads learn nothing new without backbone changes, so there is nothing to keep.
        distill=bool(base.old_tasks) and not cache and objective == CLASSIFY,
        objective=objective,
        auto_lr=follows_lr and config.lr == AUTO,
    )


def _lr_decay(config: TransferConfig, base: _Base) -> float:
    if config.lr_decay is not None:
        return config.lr_decay
    if config.strategy == "ulmfit":
        return ULMFIT_LR_DECAY
    return MODALITY_DEFAULTS[base.modality].lr_decay


def _default_schedule(config: TransferConfig, base: _Base) -> Schedule:
    return preset_defaults(base.modality, config.strategy).schedule or DEFAULT_SCHEDULE


def _rates(config: TransferConfig, base: _Base) -> tuple[float, float]:
    """The head's rate on a frozen backbone, and the factor once the backbone trains."""
    defaults = MODALITY_DEFAULTS[base.modality]
    # `auto` compiles at the default rate; the finder's rate rescales those stages at run time.
    return (
        (
            default_lr(base.modality, config.strategy)
            if config.lr is None or isinstance(config.lr, str)
            else config.lr
        ),
        (
            config.fine_tune_lr_factor
            if config.fine_tune_lr_factor is not None
            else defaults.fine_tune_lr_factor
        ),
    )


def _top(base: _Base, k: int) -> tuple[str, ...]:
    return (*base.backbone_groups[len(base.backbone_groups) - k :], *base.head_groups)


def _preset_stages(config: TransferConfig, base: _Base) -> tuple[Stage, ...]:
    everything = base.all_groups
    head_epochs = config.head_epochs if config.head_epochs is not None else 1
    if config.strategy == "feature_extraction":
        return (_stage(config, base, name=HEAD, trainable=(HEAD,), epochs=config.epochs),)
    if config.strategy == "fine_tune":
        return (_stage(config, base, name="fine_tune", trainable=everything, epochs=config.epochs),)
    if config.strategy == "scratch":
        return (
            _stage(
                config,
                base,
                name="scratch",
                trainable=everything,
                epochs=config.epochs,
                top_lr=_rates(config, base)[0],
                lr_decay=1.0,
                bn_mode="train",
                follows_lr=True,
            ),
        )
    if config.strategy == "partial":
        if config.partial_groups > len(base.backbone_groups):
            raise ValueError(
                f"partial_groups: {base.base_model} has {len(base.backbone_groups)} groups; "
                f"got {config.partial_groups}"
            )
        trainable = _top(base, config.partial_groups)
        return (_stage(config, base, name="partial", trainable=trainable, epochs=config.epochs),)
    if config.strategy == "ulmfit":
        return (*_lm_stages(config, base), *_gradual_unfreeze(config, base))
    if config.strategy == "gradual_unfreeze":
        return _gradual_unfreeze(config, base)
    # freeze_unfreeze and lwf: the new head alone, then everything together.
    return (
        _stage(config, base, name=HEAD, trainable=(HEAD,), epochs=head_epochs),
        _stage(
            config,
            base,
            name="joint" if config.strategy == "lwf" else "unfreeze",
            trainable=everything,
            epochs=config.epochs - head_epochs,
        ),
    )


def _lm_stages(config: TransferConfig, base: _Base) -> tuple[Stage, ...]:
    """ulmfit's target-task language-model stage: the encoder and an LM head, on masked tokens."""
    epochs = config.lm_epochs
    if epochs is None:
        epochs = preset_defaults(base.modality, config.strategy).lm_epochs or 0
    if epochs == 0:
        return ()
    return (
        _stage(
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


def _gradual_unfreeze(config: TransferConfig, base: _Base) -> tuple[Stage, ...]:
    # ULMFiT: one more group per epoch from the top; the last stage takes what is left.
    count = min(config.epochs, len(base.backbone_groups) + 1)
    return tuple(
        _stage(
            config,
            base,
            name=HEAD if k == 0 else f"unfreeze_top_{k}",
            trainable=(HEAD,) if k == 0 else _top(base, k),
            epochs=1 if k < count - 1 else config.epochs - k,
            schedule="slanted_triangular",
        )
        for k in range(count)
    )


def _spec_groups(spec: StageSpec, where: str, base: _Base) -> tuple[str, ...]:
    known = base.all_groups
    if not spec.groups:
        raise ValueError(f"{where}.groups: list at least one group")
    chosen: set[str] = set()
    for group in spec.groups:
        if group == ALL:
            chosen |= set(known)
        elif group.startswith(TOP):
            count = group.removeprefix(TOP)
            if not count.isdigit() or not 1 <= int(count) <= len(base.backbone_groups):
                raise ValueError(
                    f"{where}.groups: {group!r} needs a count from 1 to "
                    f"{len(base.backbone_groups)}, as in 'top:2'"
                )
            chosen |= set(_top(base, int(count)))
        elif group in known:
            chosen.add(group)
        else:
            raise ValueError(
                f"{where}.groups: unknown group {group!r}; groups are {', '.join(known)}, "
                f"or {ALL!r}, or 'top:<k>'"
            )
    return tuple(group for group in known if group in chosen)


def _spec_stage(config: TransferConfig, base: _Base, index: int, spec: StageSpec) -> Stage:
    where = f"stages[{index}]"
    if spec.lr is not None and spec.lrs is not None:
        raise ValueError(f"{where}: give lr or lrs, not both")
    trainable = _spec_groups(spec, where, base)
    stage = _stage(
        config,
        base,
        name=spec.name or f"stage{index + 1}",
        trainable=trainable,
        epochs=spec.epochs,
        top_lr=spec.lr,
        schedule=spec.schedule,
        lr_decay=spec.lr_decay,
        bn_mode=spec.bn_mode,
    )
    if spec.lrs is not None:
        if set(spec.lrs) != set(trainable):
            raise ValueError(
                f"{where}.lrs must give a rate for exactly the trainable groups "
                f"{', '.join(trainable)}; got {', '.join(spec.lrs)}"
            )
        bad = [name for name, rate in spec.lrs.items() if not rate > 0]
        if bad:
            raise ValueError(
                f"{where}.lrs: rates must be positive; {bad[0]!r} is {spec.lrs[bad[0]]}"
            )
        stage = replace(
            stage, group_lrs={name: spec.lrs[name] for name in trainable}, auto_lr=False
        )
    return replace(
        stage, image_size=base.image_size if spec.image_size is None else spec.image_size
    )


def _split_epochs(epochs: int, parts: int) -> list[int]:
    """`epochs` into `parts` consecutive counts; the remainder goes to the last (largest)."""
    return [epochs // parts] * (parts - 1) + [epochs // parts + epochs % parts]


def _resize_progressively(stage: Stage, sizes: tuple[int, ...]) -> list[Stage]:
    """Sub-stages at increasing sizes; a stage shorter than the list uses its largest sizes."""
    used = sizes[-stage.epochs :] if stage.epochs < len(sizes) else sizes
    return [
        replace(stage, name=f"{stage.name}@{size}", epochs=epochs, image_size=size)
        for size, epochs in zip(used, _split_epochs(stage.epochs, len(used)), strict=True)
    ]


def _task_name(config: TransferConfig) -> str:
    return config.task_name or DEFAULT_TASK


def compile_plan(config: TransferConfig) -> Plan:
    """Validate `config` and expand its strategy (or its stages) into a plan.

    A pure function of the config (the parent, if any, comes as data): it reads no files.
    Raises ValueError, naming the offending field, when the config is invalid.
    """
    if config.parent is None:
        get_base_model_info(config.base_model)
    _validate(config)
    if config.strategy == "ulmfit" and config.stages is not None:
        raise ValueError("the ulmfit strategy compiles its own stages; drop stages")
    base = _resolve_base(config)
    stages = (
        tuple(_spec_stage(config, base, i, spec) for i, spec in enumerate(config.stages))
        if config.stages is not None
        else _preset_stages(config, base)
    )
    if config.progressive_resizing is not None:
        info = get_base_model_info(base.base_model)
        if info.fixed_input_size:
            raise ValueError(
                f"progressive_resizing: {base.base_model} only accepts {info.input_size}px images"
            )
        stages = tuple(
            sub
            for stage in stages
            for sub in _resize_progressively(stage, config.progressive_resizing)
        )
    if config.train_size is not None:
        stages = tuple(
            replace(stage, passes=cached_passes(stage, config.train_size, config.batch_size))
            for stage in stages
        )
    extra: dict[str, Any] = {"strategy": config.strategy}
    own_defaults = applied_defaults(base.modality, config.strategy, config)
    if own_defaults:
        extra["defaults"] = own_defaults
    if config.parent is not None:
        extra["parent"] = config.base_model
    run_settings = {item.name: getattr(config, item.name) for item in fields(RunSettings)}
    return Plan(
        **run_settings,
        base_model=base.base_model,
        num_classes=config.num_classes,
        head=config.head,
        stages=stages,
        pretrained=config.pretrained and config.strategy != "scratch",
        mean=base.mean,
        std=base.std,
        parent=base.parent_location,
        modality=base.modality,
        max_length=base.max_length,
        truncation=base.truncation,
        task_name=_task_name(config),
        old_tasks=base.old_tasks,
        extra=extra,
    )


def with_found_lr(plan: Plan, lr: float) -> Plan:
    """The plan of a spec with `lr: auto` once the learning-rate finder chose `lr` (the head's
    rate on a frozen backbone): every stage that follows `lr` keeps its groups' ratios, scaled
    from the default rate it was compiled at; `extra["lr"]` records the choice."""
    default = default_lr(plan.modality, plan.extra.get("strategy", ""))
    stages = tuple(
        replace(
            stage,
            group_lrs={name: rate * lr / default for name, rate in stage.group_lrs.items()},
            auto_lr=False,
        )
        if stage.auto_lr
        else stage
        for stage in plan.stages
    )
    return replace(plan, stages=stages, extra={**plan.extra, "lr": {AUTO: lr}})


def cached_passes(stage: Stage, train_size: int, batch_size: int) -> int:
    """Passes over `train_size` items per epoch that give a stage on cached features at least
    `FEW_SHOT_HEAD_STEPS` steps over its epochs; 1 for a stage that trains the backbone."""
    if not stage.cache_features:
        return 1
    return max(
        1, math.ceil(FEW_SHOT_HEAD_STEPS / (stage.epochs * _steps_per_pass(train_size, batch_size)))
    )


def _steps_per_pass(train_size: int, batch_size: int) -> int:
    return math.ceil(train_size / batch_size)


def steps_per_epoch(plan: Plan, stage: Stage, train_size: int) -> int:
    """Optimizer steps in one epoch of `stage` on `train_size` items."""
    return stage.passes * _steps_per_pass(train_size, plan.batch_size)
