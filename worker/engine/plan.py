"""Turn a user's transfer-learning request into an explicit, serialisable training plan.

A plan is a list of stages; each says which parameter groups train, at which learning rate,
for how many epochs, with which schedule, at which image size, and how BatchNorm behaves.
Every preset compiles to stages, and so do stages a user writes out. The training loop only
executes plans, so what will happen can be shown (`describe_plan`) before anything runs.
"""

import math
from dataclasses import fields, replace
from typing import Any

from .artifacts import ModelConfig
from .data_defaults import data_defaults
from .modalities import MODALITIES, Modality, modality_for
from .preset_defaults import applied_defaults, default_lr
from .spec import (
    ALL,
    AUTO,
    FEW_SHOT_HEAD_STEPS,
    HEAD_C_GRID,
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    HeadConfig,
    RunSettings,
    SpecError,
    StageSpec,
    check_settings,
    decode,
)
from .stages import (
    CLASSIFY,
    DEFAULT_TASK,
    HEAD,
    LM_HEAD,
    MASKED_LM,
    OLD_HEADS,
    TOP,
    Base,
    ParentModel,
    Plan,
    Stage,
    TaskInfo,
    TransferConfig,
    make_stage,
)
from .strategies import STRATEGIES, Strategy, strategy_named
from .zoo import get_base_model_info

# The stage's names, re-exported: callers read a plan's parts from here.
__all__ = [
    "CLASSIFY",
    "DEFAULT_TASK",
    "HEAD",
    "LM_HEAD",
    "MASKED_LM",
    "OLD_HEADS",
    "ParentModel",
    "Plan",
    "Stage",
    "TaskInfo",
    "TransferConfig",
    "cached_passes",
    "compile_plan",
    "parent_tasks",
    "spec_lr_for",
    "steps_per_epoch",
    "with_found_lr",
]


def _validate(config: TransferConfig, strategy: Strategy) -> None:
    if config.num_classes < 2:
        raise SpecError("num_classes", f"num_classes must be at least 2; got {config.num_classes}")
    sizes = config.progressive_resizing
    if sizes is not None and (not sizes or list(sizes) != sorted(set(sizes))):
        raise SpecError(
            "progressive_resizing",
            f"progressive_resizing must be strictly increasing sizes between {MIN_IMAGE_SIZE} "
            f"and {MAX_IMAGE_SIZE}; got {sizes}",
        )
    if sizes is not None and config.image_size is not None and sizes[-1] != config.image_size:
        raise SpecError(
            "progressive_resizing",
            f"progressive_resizing must end at image_size {config.image_size}; got {sizes}",
        )
    if config.head_epochs is not None and not strategy.takes_head_epochs:
        takers = " and ".join(name for name, s in STRATEGIES.items() if s.takes_head_epochs)
        raise SpecError("head_epochs", f"head_epochs only applies to the {takers} strategies")
    for other in STRATEGIES.values():
        for name in other.settings:
            if other is not strategy and getattr(config, name) is not None:
                raise SpecError(name, f"{name} only applies to the {other.name} strategy")
    strategy.check(config)
    if config.stages is not None and not config.stages:
        raise SpecError("stages", "stages must list at least one stage when given")
    if config.train_size is not None and config.train_size < 1:
        raise SpecError("train_size", f"train_size must be at least 1; got {config.train_size}")


def _solves_head(config: TransferConfig) -> bool:
    """The presets' head-only stages are solved: asked for, the head is linear (convex), and
    the spec did not ask for several head epochs (`head_epochs` > 1 steps the head for them)."""
    return config.solve_head and not config.head.hidden and (config.head_epochs or 1) <= 1


def _solved(stage: Stage) -> Stage:
    return replace(stage, solve=True, epochs=1, c_grid=HEAD_C_GRID)


def parent_tasks(config: ModelConfig) -> tuple[TaskInfo, ...]:
    """Every task an exported model answers, oldest first; its own head is the last."""
    return tuple(
        TaskInfo(name=task.name, labels=task.labels, head=decode(HeadConfig, task.head))
        for task in config.tasks
    )


def _check_modality(
    config: TransferConfig, strategy: Strategy, modality: Modality, base_model: str
) -> None:
    modality.check_settings(config, base_model)
    if not strategy.objectives <= modality.objectives:
        takers = [other.name for other in MODALITIES if strategy.objectives <= other.objectives]
        raise SpecError(
            "strategy",
            f"strategy: {strategy.name} is for {' and '.join(takers)} base models; "
            f"{base_model} takes {modality.items}",
        )


def _resolve_base(config: TransferConfig, strategy: Strategy) -> Base:
    if config.parent is None:
        info = get_base_model_info(config.base_model)
        modality = modality_for(info.modality)
        _check_modality(config, strategy, modality, config.base_model)
        return modality.new_base(config, info)
    parent = config.parent.config
    parent_plan = Plan.from_dict(parent.plan)
    info = get_base_model_info(parent_plan.base_model)
    modality = modality_for(parent_plan.modality)
    _check_modality(config, strategy, modality, parent_plan.base_model)
    old_tasks = parent_tasks(parent) if strategy.keeps_parent_tasks else ()
    clash = [task.name for task in old_tasks if task.name == _task_name(config)]
    if clash:
        raise SpecError(
            "task_name",
            f"task_name: the parent already answers a task named {clash[0]!r}; "
            "give the new task another name",
        )
    return modality.parent_base(config, info, parent_plan, old_tasks)


def _spec_groups(spec: StageSpec, where: str, base: Base) -> tuple[str, ...]:
    known = base.all_groups
    if not spec.groups:
        raise SpecError(f"{where}.groups", f"{where}.groups: list at least one group")
    chosen: set[str] = set()
    for group in spec.groups:
        if group == ALL:
            chosen |= set(known)
        elif group.startswith(TOP):
            count = group.removeprefix(TOP)
            if not count.isdigit() or not 1 <= int(count) <= len(base.backbone_groups):
                raise SpecError(
                    f"{where}.groups",
                    f"{where}.groups: {group!r} needs a count from 1 to "
                    f"{len(base.backbone_groups)}, as in 'top:2'",
                )
            chosen |= set(base.top(int(count)))
        elif group in known:
            chosen.add(group)
        else:
            raise SpecError(
                f"{where}.groups",
                f"{where}.groups: unknown group {group!r}; groups are {', '.join(known)}, "
                f"or {ALL!r}, or 'top:<k>'",
            )
    return tuple(group for group in known if group in chosen)


def _spec_stage(config: TransferConfig, base: Base, index: int, spec: StageSpec) -> Stage:
    where = f"stages[{index}]"
    if spec.lr is not None and spec.lrs is not None:
        raise SpecError(where, f"{where}: give lr or lrs, not both")
    trainable = _spec_groups(spec, where, base)
    compiled = make_stage(
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
            raise SpecError(
                f"{where}.lrs",
                f"{where}.lrs must give a rate for exactly the trainable groups "
                f"{', '.join(trainable)}; got {', '.join(spec.lrs)}",
            )
        bad = [name for name, rate in spec.lrs.items() if not rate > 0]
        if bad:
            raise SpecError(
                f"{where}.lrs",
                f"{where}.lrs: rates must be positive; {bad[0]!r} is {spec.lrs[bad[0]]}",
            )
        compiled = replace(
            compiled, group_lrs={name: spec.lrs[name] for name in trainable}, auto_lr=False
        )
    return replace(
        compiled, image_size=base.image_size if spec.image_size is None else spec.image_size
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
    Raises SpecError, naming the offending field, when the config is invalid.
    """
    if config.parent is None:
        get_base_model_info(config.base_model)
    check_settings(config)  # the strategy's name is one of the registry's from here on
    strategy = strategy_named(config.strategy)
    _validate(config, strategy)
    if strategy.compiles_own_stages and config.stages is not None:
        raise SpecError(
            "stages", f"the {strategy.name} strategy compiles its own stages; drop stages"
        )
    base = _resolve_base(config, strategy)
    base = replace(
        base,
        added_groups=strategy.added_groups,
        strategy_lr_decay=strategy.lr_decay,
        family=get_base_model_info(base.base_model).family,
        preset=modality_for(base.modality).preset(config.strategy),
    )
    stages = (
        tuple(_spec_stage(config, base, i, spec) for i, spec in enumerate(config.stages))
        if config.stages is not None
        else strategy.stages(config, base)
    )
    if config.stages is None and _solves_head(config):
        stages = tuple(
            _solved(stage) if stage.cache_features and stage.objective == CLASSIFY else stage
            for stage in stages
        )
    if config.progressive_resizing is not None:
        stages = tuple(
            sub
            for stage in stages
            for sub in _resize_progressively(stage, config.progressive_resizing)
        )
    batch_size = config.batch_size or base.defaults.batch_size
    if batch_size % config.gpus:
        raise SpecError(
            "gpus",
            f"gpus: batch_size {batch_size} does not split evenly over {config.gpus} "
            f"processes; choose a batch_size that is a multiple of {config.gpus}",
        )
    if config.train_size is not None:
        stages = tuple(
            replace(stage, passes=cached_passes(stage, config.train_size, batch_size))
            for stage in stages
        )
    extra: dict[str, Any] = {"strategy": config.strategy}
    notes = strategy.notes(config, base)
    if notes:
        extra[strategy.name] = notes
    own_defaults = applied_defaults(base.preset, config)
    if own_defaults:
        extra["preset_defaults"] = own_defaults
    if config.parent is not None:
        extra["parent"] = config.base_model
    run_settings = {item.name: getattr(config, item.name) for item in fields(RunSettings)}
    resolved, chosen = data_defaults(
        config,
        modality=base.modality,
        num_classes=config.num_classes,
        train_size=config.train_size,
        last_stage_distills=stages[-1].distill,
    )
    run_settings |= resolved | {"batch_size": batch_size}
    if chosen is not None:
        extra["defaults"] = chosen
    return Plan(
        **run_settings,
        base_model=base.base_model,
        num_classes=config.num_classes,
        head=config.head,
        stages=stages,
        pretrained=config.pretrained and strategy.pretrained,
        preprocessing=base.preprocessing,
        parent=base.parent_location,
        task_name=_task_name(config),
        old_tasks=base.old_tasks,
        extra=extra,
    )


def _auto_lr(plan: Plan) -> float:
    """The rate a plan's `lr: auto` stages were compiled at: its modality's and preset's default
    `lr`."""
    modality = modality_for(plan.modality)
    return default_lr(modality.defaults, modality.preset(plan.extra.get("strategy", "")))


def spec_lr_for(plan: Plan, stage_index: int, top: float) -> float | None:
    """The spec's `lr` that gives the stage's top group the rate `top` (`with_found_lr`'s
    inverse). A stage that follows `lr: auto` scales with `lr`; other stages' rates do not
    follow `lr` alone (None)."""
    stage = plan.stages[stage_index]
    if not stage.auto_lr:
        return None
    return top * _auto_lr(plan) / max(stage.group_lrs.values())


def with_found_lr(plan: Plan, lr: float) -> Plan:
    """The plan of a spec with `lr: auto` once the learning-rate finder chose `lr` (the head's
    rate on a frozen backbone): every stage that follows `lr` keeps its groups' ratios, scaled
    from the default rate it was compiled at; `extra["lr"]` records the choice."""
    default = _auto_lr(plan)
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
    `FEW_SHOT_HEAD_STEPS` steps over its epochs; 1 for a stage that trains the backbone or
    a solved one."""
    if not stage.cache_features or stage.solve:
        return 1
    return max(
        1, math.ceil(FEW_SHOT_HEAD_STEPS / (stage.epochs * _steps_per_pass(train_size, batch_size)))
    )


def _steps_per_pass(train_size: int, batch_size: int) -> int:
    return math.ceil(train_size / batch_size)


def steps_per_epoch(plan: Plan, stage: Stage, train_size: int) -> int:
    """Optimizer steps in one epoch of `stage` on `train_size` items (a solved stage: one
    per L2 strength it fits)."""
    if stage.solve:
        assert stage.c_grid is not None
        return len(stage.c_grid)
    return stage.passes * _steps_per_pass(train_size, plan.batch_size)
