"""What a plan is made of, and the one way a strategy makes a stage.

Standard library only, like `spec.py`: the API, the model card, the dashboard and the CLI read
stored plans as typed `Plan`s (`Plan.from_dict`) without importing torch.

A stage says which parameter groups train, at which rates, for how many epochs. `Base` is
what the stages are built on (the architecture's groups and sizes, the parent's tasks);
`stage` gives the rates their defaults (discriminative rates below the top group). The
strategies (`strategies/`) and `plan.compile_plan` build on these; nothing here knows a
strategy's name.
"""

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

from .artifacts import ModelConfig, ModelConfigError, read_model_config
from .preset_defaults import DEFAULT_SCHEDULE, PresetDefaults, default_lr
from .spec import (
    AUTO,
    AugmentLevel,
    BatchNormMode,
    HeadConfig,
    ModalityDefaults,
    RunSettings,
    Schedule,
    TransferSettings,
    TtaMode,
    decode,
)

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
    """An image stage's input size (its modality's `stage_inputs` shows it); None for text."""
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
    solve: bool = False
    """The head is linear and the backbone frozen: the stage fits the head to its optimum on
    the cached features in its one epoch (`linear_probe.probe` over `c_grid`) instead of
    stepping it."""
    c_grid: tuple[float, ...] | None = None
    """A solved stage's L2 strengths (scikit-learn's C): `HEAD_C_GRID`, or (a refit) the one
    its run chose."""


@dataclass(frozen=True)
class TaskInfo:
    """A task an LwF model keeps answering: its head's shape and its labels."""

    name: str
    labels: tuple[str, ...]
    head: HeadConfig


def discriminative_lrs(top_lr: float, groups: tuple[str, ...], decay: float) -> dict[str, float]:
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
class Preprocessing:
    """How a plan's items become model input, of its modality's own kind: each modality
    subclasses this in its folder (`modalities/<name>/preprocessing.py`, its
    `Modality.preprocessing`), so `Base` and `Plan` carry no field of one modality. The
    preview, the feature key and `config.json`'s `preprocessing` are built from it. Its JSON
    form (`to_dict`) carries its `modality` as a tag; standard library values only."""

    modality: ClassVar[str]
    """The modality's name (`Modality.name`)."""

    def to_dict(self) -> dict[str, Any]:
        return {"modality": self.modality, **asdict(self)}

    @classmethod
    def of(cls, plan: "Plan | Base") -> Self:
        """`plan`'s preprocessing, which must be of this kind (ValueError otherwise)."""
        if not isinstance(plan.preprocessing, cls):
            raise ValueError(f"{plan.modality} plans have no {cls.modality} preprocessing")
        return plan.preprocessing

    @classmethod
    def from_flat(cls, data: dict[str, Any]) -> Self:
        """This kind read from a plan stored before `preprocessing` was one field, when its
        fields were the plan's own (`FLAT_PREPROCESSING`)."""
        raise NotImplementedError(f"no {cls.modality} plan was stored in the flat form")


FLAT_PREPROCESSING = ("mean", "std", "max_length", "truncation")
"""A plan's own fields before `Plan.preprocessing` held them (plans stored with jobs and in
published versions' `config.json`): `Plan.from_dict` reads them through the modality's
`Preprocessing.from_flat`. A modality added since has no such fields."""


@dataclass(frozen=True)
class Base:
    """What the stages are built on: the architecture's groups, sizes and the parent, if any,
    its modality's defaults, and what the strategy adds (its groups, its default `lr_decay`,
    the preset's own defaults on the modality)."""

    base_model: str
    backbone_groups: tuple[str, ...]
    image_size: int | None
    """Each stage's (`Stage.image_size`)."""
    preprocessing: Preprocessing
    """Of the modality's own kind (`Modality.preprocessing`)."""
    parent_location: str | None
    old_tasks: tuple[TaskInfo, ...]
    defaults: ModalityDefaults
    """The modality's (`Modality.defaults`)."""
    added_groups: tuple[str, ...] = ()
    """Groups the strategy adds to the model (`Strategy.added_groups`), between the backbone
    and the heads: a stage training one of them changes the features, so is never cached."""
    strategy_lr_decay: float | None = None
    """The strategy's own default `lr_decay`, if it has one, over the modality's."""
    family: str = ""
    """The architecture's family in the zoo (`BaseModelInfo.family`)."""
    preset: PresetDefaults = field(default_factory=PresetDefaults)
    """The strategy's own defaults on the modality (`Modality.preset`)."""

    @property
    def modality(self) -> str:
        """A name in the modality registry (`modalities.MODALITIES`)."""
        return self.preprocessing.modality

    @property
    def head_groups(self) -> tuple[str, ...]:
        return (OLD_HEADS, HEAD) if self.old_tasks else (HEAD,)

    @property
    def all_groups(self) -> tuple[str, ...]:
        return (*self.backbone_groups, *self.added_groups, *self.head_groups)

    def lr_decay(self, config: TransferConfig) -> float:
        if config.lr_decay is not None:
            return config.lr_decay
        if self.strategy_lr_decay is not None:
            return self.strategy_lr_decay
        return self.defaults.lr_decay

    def rates(self, config: TransferConfig) -> tuple[float, float]:
        """The head's rate on a frozen backbone, and the factor once the backbone trains."""
        # `auto` compiles at the default rate; the finder's rate rescales those stages at
        # run time.
        return (
            (
                default_lr(self.defaults, self.preset)
                if config.lr is None or isinstance(config.lr, str)
                else config.lr
            ),
            (
                config.fine_tune_lr_factor
                if config.fine_tune_lr_factor is not None
                else self.defaults.fine_tune_lr_factor
            ),
        )

    def top(self, k: int) -> tuple[str, ...]:
        """The top `k` backbone groups and the heads."""
        return (*self.backbone_groups[len(self.backbone_groups) - k :], *self.head_groups)


def make_stage(
    config: TransferConfig,
    base: Base,
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
    cache = objective == CLASSIFY and not set(trainable) - set(base.head_groups)
    if follows_lr is None:
        follows_lr = top_lr is None
    own = base.preset
    boost = None
    if top_lr is None:
        head_lr, factor = base.rates(config)
        top_lr = head_lr if cache else head_lr * factor
        boost = None if cache else own.head_boost
    group_lrs = discriminative_lrs(
        top_lr, trainable, base.lr_decay(config) if lr_decay is None else lr_decay
    )
    if boost is not None and HEAD in group_lrs:
        group_lrs[HEAD] *= boost
    return Stage(
        name=name,
        trainable_groups=trainable,
        group_lrs=group_lrs,
        epochs=epochs,
        schedule=schedule or config.schedule or own.schedule or DEFAULT_SCHEDULE,
        bn_mode="frozen" if cache else (bn_mode or config.bn_mode),
        image_size=base.image_size,
        cache_features=cache,
        # The old heads learn nothing new without backbone changes, so there is nothing to keep.
        distill=bool(base.old_tasks) and not cache and objective == CLASSIFY,
        objective=objective,
        auto_lr=follows_lr and config.lr == AUTO,
    )


@dataclass(frozen=True, kw_only=True)
class Plan(RunSettings):
    """A compiled plan: the run settings as asked, plus everything resolved from the zoo,
    the preset and the parent. Its JSON form (`to_dict`) is stored with jobs and versions."""

    base_model: str
    num_classes: int
    head: HeadConfig
    stages: tuple[Stage, ...]
    augment: AugmentLevel = "none"
    """As the spec asked, or what its data chose when left out (`data_defaults`)."""
    label_smoothing: float = 0.0
    """As `augment`."""
    refit: bool = False
    """As `augment`."""
    tta: TtaMode = "none"
    """As `augment`."""
    batch_size: int = 32
    """As the spec asked, or the base model's modality's default."""
    pretrained: bool
    preprocessing: Preprocessing
    """How its items become model input, of its modality's own kind (`Modality.preprocessing`):
    pixel statistics, a token length and truncation. On the wire a dictionary tagged with
    its `modality`."""
    parent: str | None = None
    """Start from this exported model's weights instead of ImageNet's: its `ParentModel`
    location (the service's storage key of the version). `run` gets its files as a folder."""
    task_name: str = DEFAULT_TASK
    old_tasks: tuple[TaskInfo, ...] = ()
    """LwF: the parent's tasks, whose heads are kept beside the new one."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes for people reading the plan (strategy name, parent reference)."""

    @property
    def modality(self) -> str:
        """A name in the modality registry (`modalities.MODALITIES`): its preprocessing's."""
        return self.preprocessing.modality

    @property
    def needs_lr_finder(self) -> bool:
        """The spec asked for `lr: auto` and no rate has been found for it yet."""
        return any(stage.auto_lr for stage in self.stages)

    @property
    def has_lm_stage(self) -> bool:
        return any(stage.objective == MASKED_LM for stage in self.stages)

    def to_dict(self) -> dict[str, Any]:
        # `modality` stays a key of its own: readers of stored plans (older thaw, a version's
        # stored plan read as data) find it there.
        return asdict(self) | {
            "preprocessing": self.preprocessing.to_dict(),
            "modality": self.modality,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        """Inverse of `to_dict`; fields newer than the stored plan take their defaults, and a
        plan stored with its preprocessing as its own fields (`FLAT_PREPROCESSING`) reads."""
        # The registry's modality objects import no torch; they import this module.
        from .modalities import modality_for

        # Exported models' config.json from before parents were named by key carry a host
        # path under `parent_dir`; a finished model never reads its parent again.
        # The modality is the preprocessing's tag; `modality` beside it (written for older
        # readers) must agree, and names the kind of a flat or untagged one (images before
        # texts had neither).
        flat = {"parent_dir", "modality", *FLAT_PREPROCESSING}
        kept = {name: value for name, value in data.items() if name not in flat}
        named = data.get("modality")
        stored = data.get("preprocessing")
        if isinstance(stored, Preprocessing):
            preprocessing = stored
        else:
            tagged = (stored or {}).get("modality", named or "image")
            kind = modality_for(str(tagged)).preprocessing
            if stored is None:
                preprocessing = kind.from_flat(data)
            else:
                fields_ = {name: value for name, value in stored.items() if name != "modality"}
                preprocessing = decode(kind, fields_)
        if named is not None and named != preprocessing.modality:
            raise ValueError(f"{named} plans have no {preprocessing.modality} preprocessing")
        return decode(cls, kept | {"preprocessing": preprocessing})
