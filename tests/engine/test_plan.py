import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, get_args

import pytest

from worker.engine import (
    HeadConfig,
    ParentModel,
    Plan,
    StageSpec,
    TaskInfo,
    TransferConfig,
    UnknownBaseModelError,
    build_model,
    compile_plan,
    describe_plan,
    get_base_model_info,
)
from worker.engine.artifacts import ModelConfig
from worker.engine.modalities.image.exported import ExportedImagePreprocessing
from worker.engine.modalities.image.preprocessing import (
    ImageModelInput,
    ImagePreprocessing,
    final_image_size,
)
from worker.engine.modalities.text.preprocessing import TextPreprocessing
from worker.engine.plan import spec_lr_for, steps_per_epoch, with_found_lr
from worker.engine.recipe import stage_recipes
from worker.engine.spec import HEAD_C_GRID, SpecError, Strategy
from worker.engine.strategies import STRATEGIES

RESNET_GROUPS = ("stem", "layer1", "layer2", "layer3", "layer4", "head")


def test_feature_extraction_trains_only_the_head_on_cached_features(
    make_config: Callable[..., TransferConfig],
) -> None:
    plan = compile_plan(make_config("feature_extraction", epochs=5, lr=0.01))

    (stage,) = plan.stages
    assert stage.trainable_groups == ("head",)
    assert stage.group_lrs == {"head": 0.01}
    assert stage.epochs == 5
    assert stage.bn_mode == "frozen"
    assert stage.cache_features


def test_fine_tune_uses_discriminative_rates(make_config: Callable[..., TransferConfig]) -> None:
    plan = compile_plan(make_config("fine_tune", lr=0.01, fine_tune_lr_factor=0.5, lr_decay=2.0))

    (stage,) = plan.stages
    assert stage.trainable_groups == RESNET_GROUPS
    assert stage.group_lrs == pytest.approx(
        {"head": 0.005, "layer4": 0.0025, "layer3": 0.00125, "layer2": 0.000625,
         "layer1": 0.0003125, "stem": 0.00015625}
    )  # fmt: skip
    assert stage.bn_mode == "frozen"
    assert not stage.cache_features


def test_bn_mode_applies_to_stages_that_train_the_backbone(
    make_config: Callable[..., TransferConfig],
) -> None:
    head, unfreeze = compile_plan(make_config("freeze_unfreeze", bn_mode="train")).stages

    assert head.bn_mode == "frozen"
    assert unfreeze.bn_mode == "train"


def test_freeze_unfreeze_trains_head_then_everything_slower(
    make_config: Callable[..., TransferConfig],
) -> None:
    plan = compile_plan(make_config("freeze_unfreeze", epochs=4, lr=0.002))

    head, unfreeze = plan.stages
    assert (head.name, head.trainable_groups, head.epochs) == ("head", ("head",), 1)
    assert head.cache_features
    assert head.bn_mode == "frozen"
    assert (unfreeze.name, unfreeze.trainable_groups, unfreeze.epochs) == (
        "unfreeze",
        RESNET_GROUPS,
        3,
    )
    assert unfreeze.group_lrs["head"] == pytest.approx(0.0002)
    assert max(unfreeze.group_lrs.values()) < head.group_lrs["head"]
    rates = [unfreeze.group_lrs[group] for group in RESNET_GROUPS]
    assert rates == sorted(rates)
    assert not unfreeze.cache_features
    assert unfreeze.bn_mode == "frozen"


def test_image_size_defaults_to_the_zoo_input_size(
    make_config: Callable[..., TransferConfig],
) -> None:
    plan = compile_plan(make_config(base_model="efficientnet_lite0", image_size=None))

    assert final_image_size(plan) == 224
    assert ImagePreprocessing.of(plan).mean == (
        ImageModelInput.of(get_base_model_info("efficientnet_lite0")).mean
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"num_classes": 1}, "num_classes"),
        ({"lr": 0.0}, "lr must be positive"),
        ({"batch_size": 0}, "batch_size"),
        ({"image_size": 16}, "image_size"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"strategy": "freeze_unfreeze", "epochs": 1}, "epochs >= 2"),
        ({"strategy": "freeze_unfreeze", "epochs": 3, "head_epochs": 3}, "head_epochs"),
        ({"head_epochs": 1}, "only applies to the freeze_unfreeze"),
        ({"strategy": "linear_probe"}, "strategy must be one of"),
        ({"optimizer": "lion"}, "optimizer must be one of"),
        ({"bn_mode": "sync"}, "bn_mode must be one of"),
        ({"head": HeadConfig(dropout=1.0)}, "dropout"),
        ({"early_stopping_patience": 0}, "early_stopping_patience"),
        ({"device": "toaster"}, "invalid device"),
    ],
)
def test_invalid_configs_are_rejected(
    make_config: Callable[..., TransferConfig], overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        compile_plan(make_config(**overrides))


def test_unknown_base_model_is_rejected(make_config: Callable[..., TransferConfig]) -> None:
    with pytest.raises(UnknownBaseModelError):
        compile_plan(make_config(base_model="alexnet"))


def test_plan_round_trips_through_json(make_config: Callable[..., TransferConfig]) -> None:
    plan = compile_plan(
        make_config(
            "freeze_unfreeze",
            epochs=3,
            head=HeadConfig(hidden=(32, 16), dropout=0.2),
            early_stopping_patience=2,
        )
    )

    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_describe_plan_counts_parameters_and_steps(
    make_config: Callable[..., TransferConfig],
) -> None:
    plan = compile_plan(make_config("freeze_unfreeze", epochs=3, batch_size=10))
    model = build_model(plan, weights_dir=None)
    head_parameters = 512 * 3 + 3
    total = sum(p.numel() for p in model.parameters())

    head, unfreeze = describe_plan(plan, model, train_size=95)

    assert head["trainable_groups"] == [{"name": "head", "lr": 1e-3, "parameters": head_parameters}]
    assert head["trainable_parameters"] == head_parameters
    assert head["total_parameters"] == total
    assert (head["epochs"], head["steps"], head["cache_features"]) == (1, 10, True)
    assert [group["name"] for group in unfreeze["trainable_groups"]] == list(RESNET_GROUPS)
    assert unfreeze["trainable_parameters"] == total
    assert (unfreeze["epochs"], unfreeze["steps"], unfreeze["bn_mode"]) == (2, 20, "frozen")
    assert unfreeze["image_size"] == 64
    assert describe_plan(plan, model)[0]["steps"] is None


def test_cached_stages_make_enough_passes_for_few_shot_data(
    make_config: Callable[..., TransferConfig],
) -> None:
    # 5 shots x 10 classes in batches of 8: 7 steps a pass; the 1-epoch head stage needs
    # ceil(50 / 7) = 8 passes for its 50 steps. Fine-tuning stages keep one pass an epoch.
    few = compile_plan(make_config("freeze_unfreeze", epochs=4, train_size=50))
    assert [(stage.name, stage.passes) for stage in few.stages] == [("head", 8), ("unfreeze", 1)]
    # Over 3 epochs, 3 passes each give 63 steps: 2 would give 42.
    extraction = compile_plan(make_config(epochs=3, train_size=50))
    assert extraction.stages[0].passes == 3
    # 400 items are 50 steps a pass: one is enough.
    assert compile_plan(make_config("freeze_unfreeze", train_size=400)).stages[0].passes == 1
    assert compile_plan(make_config("freeze_unfreeze")).stages[0].passes == 1
    assert compile_plan(make_config("fine_tune", train_size=10)).stages[0].passes == 1
    # Explicit stages get it too, on every stage on cached features and no other.
    stages = (
        StageSpec(groups=("head",), epochs=2),
        StageSpec(groups=("all",), epochs=2),
        StageSpec(groups=("head",), epochs=5),
    )
    written = compile_plan(make_config(stages=stages, train_size=20))
    assert [stage.passes for stage in written.stages] == [9, 1, 4]

    model = build_model(few, weights_dir=None)
    head, unfreeze = describe_plan(few, model, train_size=50)
    assert (head["passes"], head["steps"]) == (8, 56)
    assert (unfreeze["passes"], unfreeze["steps"]) == (1, 21)


def test_train_size_must_be_positive(make_config: Callable[..., TransferConfig]) -> None:
    with pytest.raises(ValueError, match="train_size must be at least 1"):
        compile_plan(make_config(train_size=0))


def test_partial_trains_the_top_groups_and_the_head(
    make_config: Callable[..., TransferConfig],
) -> None:
    plan = compile_plan(make_config("partial", partial_groups=2, lr=0.01, lr_decay=2.0))

    (stage,) = plan.stages
    assert stage.trainable_groups == ("layer3", "layer4", "head")
    assert stage.group_lrs == pytest.approx({"head": 0.001, "layer4": 0.0005, "layer3": 0.00025})
    assert not stage.cache_features
    with pytest.raises(ValueError, match="partial_groups: resnet18 has 5 groups"):
        compile_plan(make_config("partial", partial_groups=6))


def test_gradual_unfreeze_adds_one_group_per_epoch_from_the_top(
    make_config: Callable[..., TransferConfig],
) -> None:
    plan = compile_plan(make_config("gradual_unfreeze", epochs=8, lr=0.026))

    assert [stage.trainable_groups for stage in plan.stages] == [
        ("head",),
        ("layer4", "head"),
        ("layer3", "layer4", "head"),
        ("layer2", "layer3", "layer4", "head"),
        ("layer1", "layer2", "layer3", "layer4", "head"),
        RESNET_GROUPS,
    ]
    assert [stage.epochs for stage in plan.stages] == [1, 1, 1, 1, 1, 3]
    assert {stage.schedule for stage in plan.stages} == {"slanted_triangular"}
    assert plan.stages[0].cache_features
    assert plan.stages[0].group_lrs == {"head": 0.026}
    assert plan.stages[2].group_lrs == pytest.approx(
        {"head": 0.0026, "layer4": 0.001, "layer3": 0.001 / 2.6}
    )
    short = compile_plan(make_config("gradual_unfreeze", epochs=2))
    assert [stage.trainable_groups for stage in short.stages] == [("head",), ("layer4", "head")]


def test_scratch_trains_everything_from_random_weights(
    make_config: Callable[..., TransferConfig],
) -> None:
    plan = compile_plan(make_config("scratch", pretrained=True, lr=0.01, bn_mode="frozen"))

    (stage,) = plan.stages
    assert not plan.pretrained
    assert stage.trainable_groups == RESNET_GROUPS
    assert stage.group_lrs == dict.fromkeys(RESNET_GROUPS, 0.01)
    assert stage.bn_mode == "train"


def test_lwf_keeps_the_parents_head_and_architecture(
    make_config: Callable[..., TransferConfig], parent_dir: Path
) -> None:
    plan = compile_plan(
        make_config(
            "lwf", base_model="model:shapes:1", parent_dir=parent_dir, epochs=3, image_size=None
        )
    )

    assert plan.base_model == "resnet18"
    assert plan.parent == str(parent_dir)
    assert final_image_size(plan) == 64
    assert plan.old_tasks == (
        TaskInfo(name="shapes", labels=("circle", "square"), head=HeadConfig(hidden=(8,))),
    )
    warmup, joint = plan.stages
    assert (warmup.trainable_groups, warmup.epochs, warmup.distill) == (("head",), 1, False)
    assert warmup.cache_features
    assert joint.trainable_groups == (*RESNET_GROUPS[:-1], "old_heads", "head")
    assert joint.epochs == 2
    assert joint.distill
    assert joint.group_lrs["old_heads"] == joint.group_lrs["head"]
    assert (plan.lwf_temperature, plan.lwf_lambda) == (2.0, 1.0)


def test_chained_transfer_records_the_parents_architecture(
    make_config: Callable[..., TransferConfig], parent_dir: Path
) -> None:
    plan = compile_plan(
        make_config("fine_tune", base_model="model:shapes:1", parent_dir=parent_dir)
    )

    assert plan.base_model == "resnet18"
    assert plan.old_tasks == ()
    assert plan.stages[0].trainable_groups == RESNET_GROUPS
    assert not plan.stages[0].distill


def test_explicit_stages(make_config: Callable[..., TransferConfig]) -> None:
    stages = (
        StageSpec(groups=("head",), epochs=2, lr=0.01),
        StageSpec(groups=("top:2",), lr=0.004, lr_decay=2.0, schedule="one_cycle"),
        StageSpec(groups=("stem", "layer4"), lrs={"stem": 1e-5, "layer4": 1e-4}, bn_mode="train"),
        StageSpec(groups=("all",), epochs=3, image_size=96, name="everything"),
    )
    plan = compile_plan(make_config(stages=stages, lr=0.02, fine_tune_lr_factor=0.5, epochs=1))

    first, second, third, fourth = plan.stages
    assert (first.trainable_groups, first.epochs, first.group_lrs) == (("head",), 2, {"head": 0.01})
    assert first.cache_features
    assert second.trainable_groups == ("layer3", "layer4", "head")
    assert second.group_lrs == pytest.approx({"head": 0.004, "layer4": 0.002, "layer3": 0.001})
    assert second.schedule == "one_cycle"
    assert third.group_lrs == {"stem": 1e-5, "layer4": 1e-4}
    assert (third.bn_mode, third.cache_features) == ("train", False)
    assert fourth.name == "everything"
    assert fourth.trainable_groups == RESNET_GROUPS
    assert fourth.group_lrs["head"] == pytest.approx(0.01)
    assert (fourth.image_size, fourth.epochs, fourth.bn_mode) == (96, 3, "frozen")
    assert final_image_size(plan) == 96


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        (
            StageSpec(groups=("layer9",)),
            r"stages\[1\]\.groups: unknown group 'layer9'; groups are stem, layer1, layer2, "
            "layer3, layer4, head",
        ),
        (StageSpec(groups=("top:6",)), r"stages\[1\]\.groups: 'top:6' needs a count from 1 to 5"),
        (StageSpec(groups=()), r"stages\[1\]\.groups: list at least one group"),
        (StageSpec(epochs=0), r"stages\[1\]\.epochs must be at least 1"),
        (StageSpec(lr=-1.0), r"stages\[1\]\.lr must be positive"),
        (StageSpec(lr=0.1, lrs={"head": 0.1}), r"stages\[1\]: give lr or lrs, not both"),
        (
            StageSpec(groups=("layer4", "head"), lrs={"layer3": 0.1, "head": 0.1}),
            r"stages\[1\]\.lrs must give a rate for exactly the trainable groups layer4, head; "
            "got layer3, head$",
        ),
        (StageSpec(schedule="linear"), r"stages\[1\]\.schedule must be one of"),  # type: ignore[arg-type]
        (StageSpec(bn_mode="sync"), r"stages\[1\]\.bn_mode must be one of"),  # type: ignore[arg-type]
        (StageSpec(image_size=32), r"stages\[1\]\.image_size must be between"),
        (StageSpec(lr_decay=0.5), r"stages\[1\]\.lr_decay must be >= 1"),
    ],
)
def test_invalid_stages_name_the_field(
    make_config: Callable[..., TransferConfig], stage: StageSpec, message: str
) -> None:
    with pytest.raises(SpecError, match=message) as refused:
        compile_plan(make_config(stages=(StageSpec(groups=("head",)), stage)))
    # The field is the one the message names: the API points its 422 at it.
    field, said = refused.value.field, str(refused.value)
    assert field.startswith("stages[1]")
    assert f"{field}:" in said or f"{field} " in said


def test_progressive_resizing_splits_each_stage(
    make_config: Callable[..., TransferConfig],
) -> None:
    plan = compile_plan(
        make_config(
            "freeze_unfreeze",
            epochs=6,
            head_epochs=2,
            image_size=128,
            progressive_resizing=(64, 96, 128),
        )
    )

    assert [(s.name, s.image_size, s.epochs) for s in plan.stages] == [
        ("head@96", 96, 1),
        ("head@128", 128, 1),
        ("unfreeze@64", 64, 1),
        ("unfreeze@96", 96, 1),
        ("unfreeze@128", 128, 2),
    ]
    assert final_image_size(plan) == 128
    with pytest.raises(ValueError, match="progressive_resizing must end at image_size 96"):
        compile_plan(make_config(image_size=96, progressive_resizing=(64, 128)))
    with pytest.raises(ValueError, match="progressive_resizing must be strictly increasing"):
        compile_plan(make_config(image_size=None, progressive_resizing=(96, 64)))


def test_fixed_size_models_refuse_other_sizes(make_config: Callable[..., TransferConfig]) -> None:
    with pytest.raises(SpecError, match="image_size: vit_b_16 only accepts 224px") as refused:
        compile_plan(make_config(base_model="vit_b_16", image_size=64))
    assert refused.value.field == "image_size"
    with pytest.raises(ValueError, match="progressive_resizing: vit_b_16 only accepts 224px"):
        compile_plan(
            make_config(base_model="vit_b_16", image_size=224, progressive_resizing=(128, 224))
        )


NO_CONFIG = ModelConfig(
    tasks=(),
    preprocessing=ExportedImagePreprocessing(image_size=64, mean=(0, 0, 0), std=(1, 1, 1)),
    plan={},
)
"""A parent the scratch check refuses before reading anything of it."""


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"strategy": "lwf"}, "lwf strategy needs parent_dir"),
        (
            {"strategy": "scratch", "parent": ParentModel(location="/nowhere", config=NO_CONFIG)},
            "scratch strategy starts",
        ),
        ({"strategy": "fine_tune", "parent_dir": Path("/nowhere")}, "parent_dir: cannot read"),
        ({"partial_groups": 0}, "partial_groups must be at least 1"),
        ({"lwf_temperature": 0.0}, "lwf_temperature must be positive"),
        ({"stages": ()}, "stages must list at least one stage"),
        ({"schedule": "step"}, "schedule must be one of"),
    ],
)
def test_invalid_new_fields_are_rejected(
    make_config: Callable[..., TransferConfig], overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        compile_plan(make_config(**overrides))


def test_lwf_task_names_must_differ(
    make_config: Callable[..., TransferConfig], parent_dir: Path
) -> None:
    with pytest.raises(
        SpecError,
        match=r"^task_name: the parent already answers a task named 'shapes'; give the new task "
        r"another name$",
    ) as refused:
        compile_plan(make_config("lwf", parent_dir=parent_dir, task_name="shapes"))
    assert refused.value.field == "task_name"


def test_every_new_field_round_trips_through_json(
    make_config: Callable[..., TransferConfig], parent_dir: Path
) -> None:
    plan = compile_plan(
        make_config(
            "lwf",
            parent_dir=parent_dir,
            epochs=4,
            image_size=96,
            progressive_resizing=(64, 96),
            lwf_temperature=3.0,
            lwf_lambda=0.5,
            amp=False,
            amp_cpu=True,
            task_name="colours",
            schedule="one_cycle",
        )
    )

    restored = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))

    assert restored == plan
    assert any(stage.distill for stage in restored.stages)


def test_plans_stored_before_the_new_fields_still_load(
    make_config: Callable[..., TransferConfig],
) -> None:
    stored = compile_plan(make_config()).to_dict()
    for key in ("parent", "task_name", "old_tasks", "lwf_temperature", "lwf_lambda", "amp"):
        del stored[key]
    for stage in stored["stages"]:
        del stage["distill"]

    assert Plan.from_dict(stored).old_tasks == ()


def test_a_plan_exported_with_a_parent_folder_path_still_loads(
    make_config: Callable[..., TransferConfig], parent_dir: Path
) -> None:
    stored = compile_plan(make_config("fine_tune", parent_dir=parent_dir)).to_dict()
    stored["parent_dir"] = stored.pop("parent")  # as config.json files written before keys

    assert Plan.from_dict(stored).parent is None


def test_every_strategy_the_spec_offers_is_one_registered_module() -> None:
    # The spec's choices (the API schema) and the registry compile_plan asks must agree.
    assert list(STRATEGIES) == list(get_args(Strategy))
    for name, strategy in STRATEGIES.items():
        assert strategy.name == name
        assert type(strategy).__module__.startswith(f"worker.engine.strategies.{name}")


@pytest.mark.parametrize(
    ("train_size", "augment", "label_smoothing", "reason"),
    [(15, "none", 0.0, "5 training images per class is under 80"),
     (204, "none", 0.0, "68 training images per class is under 80"),
     (240, "light", 0.1, "80 training images per class is at least 80"),
     (None, "none", 0.0, "size is unknown")],
    ids=["few-shot", "68-per-class", "many-shot", "unknown-size"],
)  # fmt: skip
def test_unset_augmentation_follows_the_images_per_class(
    make_config: Callable[..., TransferConfig],
    train_size: int | None,
    augment: str,
    label_smoothing: float,
    reason: str,
) -> None:
    plan = compile_plan(make_config("freeze_unfreeze", epochs=3, train_size=train_size))

    assert (plan.augment, plan.label_smoothing) == (augment, label_smoothing)
    chosen = plan.extra["defaults"]
    assert (chosen["augment"], chosen["label_smoothing"]) == (augment, label_smoothing)
    assert reason in chosen["why"]
    # What the spec sets wins, and only what it left out is noted.
    explicit = compile_plan(
        make_config("freeze_unfreeze", epochs=3, train_size=train_size, augment="strong")
    )
    assert (explicit.augment, explicit.extra["defaults"]["label_smoothing"]) == (
        "strong",
        label_smoothing,
    )
    assert "augment" not in explicit.extra["defaults"]


@pytest.mark.parametrize(
    ("settings", "tta", "reason"),
    [({"train_size": 240}, "flip", "trains on mirrored images (augment `light`)"),
     ({"train_size": 240, "augment": "standard"}, "flip", "mirrored images (augment `standard`)"),
     ({"train_size": 15, "augment": "light"}, "flip", "mirrored images (augment `light`)"),
     ({"train_size": 15}, "none", "trains on unaugmented images"),
     ({"train_size": 240, "augment": "none"}, "none", "trains on unaugmented images"),
     ({"train_size": 240, "flip": False}, "none", "flip is false"),
     ({"train_size": None}, "none", "trains on unaugmented images")],
    ids=["many-shot", "standard", "few-shot-light", "few-shot", "augment-none", "no-flip",
         "unknown-size"],
)  # fmt: skip
def test_unset_tta_flips_exactly_when_the_last_stage_trains_on_mirrored_images(
    make_config: Callable[..., TransferConfig], settings: dict[str, Any], tta: str, reason: str
) -> None:
    plan = compile_plan(make_config("freeze_unfreeze", epochs=3, **settings))

    assert plan.tta == tta
    assert plan.extra["defaults"]["tta"] == tta
    assert reason in plan.extra["defaults"]["tta_why"]
    assert stage_recipes(plan)[-1]["tta"] == (
        ["original", "flip"] if tta == "flip" else ["original"]
    )
    # What the spec sets wins, and is not noted as a default.
    for asked in ("none", "flip_crops"):
        explicit = compile_plan(make_config("freeze_unfreeze", epochs=3, **settings, tta=asked))
        assert explicit.tta == asked
        assert "tta" not in (explicit.extra.get("defaults") or {})


def test_unset_tta_is_none_where_the_last_stage_distils_unaugmented_images(
    make_config: Callable[..., TransferConfig], parent_dir: Path
) -> None:
    # LwF's joint stage distils the parent's outputs recorded on plain images, so it trains
    # unaugmented (`augment_level`) though the plan's `augment` is `light`.
    plan = compile_plan(
        make_config(
            "lwf",
            base_model="model:shapes:1",
            parent_dir=parent_dir,
            epochs=3,
            image_size=None,
            train_size=240,
        )
    )

    assert (plan.augment, plan.stages[-1].distill) == ("light", True)
    assert plan.tta == "none"
    assert "trains on unaugmented images" in plan.extra["defaults"]["tta_why"]


def test_solved_head_stages_show_in_the_preview(
    make_config: Callable[..., TransferConfig],
) -> None:
    plan = compile_plan(make_config("gradual_unfreeze", epochs=4, solve_head=True, train_size=24))

    head, *rest = stage_recipes(plan)
    assert head["solver"]["c_grid"] == list(HEAD_C_GRID)
    assert head["passes"] == 1
    assert all(recipe["solver"] is None for recipe in rest)
    assert [stage.epochs for stage in plan.stages] == [1, 1, 1, 1]
    # Several head epochs asked for are stepped, as asked; the rest of `epochs` follows.
    stepped = compile_plan(make_config("freeze_unfreeze", epochs=3, solve_head=True, head_epochs=2))
    assert [(stage.solve, stage.epochs) for stage in stepped.stages] == [(False, 2), (False, 1)]
    hidden = compile_plan(
        make_config("freeze_unfreeze", epochs=3, head=HeadConfig(hidden=(8,)), solve_head=True)
    )
    assert not hidden.stages[0].solve


@pytest.mark.parametrize(
    ("strategy", "settings", "field"),
    [
        ("fine_tune", {"head_epochs": 2}, "head_epochs"),
        ("freeze_unfreeze", {"epochs": 1}, "epochs"),
        ("partial", {"partial_groups": 9}, "partial_groups"),
        ("fine_tune", {"stages": (StageSpec(groups=("layer9",)),)}, "stages[0].groups"),
        ("fine_tune", {"max_length": 64}, "max_length"),
        ("scratch", {"lora_rank": 4}, "lora_rank"),
    ],
)
def test_a_refused_setting_names_its_field(
    make_config: Callable[..., TransferConfig],
    strategy: str,
    settings: dict[str, object],
    field: str,
) -> None:
    with pytest.raises(SpecError) as refused:
        compile_plan(make_config(strategy, **settings))
    assert refused.value.field == field


def test_a_stored_plan_reads_typed_without_torch_with_the_specs_defaults(
    make_config: Callable[..., TransferConfig],
) -> None:
    """The API, the card, the dashboard and the CLI read stored plans with `Plan.from_dict`,
    in processes that have not loaded torch; a field the stored plan lacks takes the spec's
    default (`feature_views` 4), which the recipe shows."""
    stored = compile_plan(make_config("feature_extraction", augment="light")).to_dict()
    del stored["feature_views"]
    code = (
        "import json, sys\n"
        "for name in ('torch', 'torchvision', 'timm', 'transformers', 'numpy'):\n"
        "    sys.modules[name] = None  # importing any of them now fails\n"
        "from worker.engine.recipe import stage_recipes\n"
        "from worker.engine.stages import Plan\n"
        "plan = Plan.from_dict(json.loads(sys.stdin.read()))\n"
        "print(json.dumps([plan.feature_views, stage_recipes(plan)[0]['feature_views']]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(stored),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [4, 4]


@pytest.mark.parametrize(
    ("train_size", "refit", "reason"),
    [(400, True, "400 training items is at most 5000"),
     (5000, True, "at most 5000"),
     (5001, False, "5001 training items is over 5000"),
     (None, False, "size is unknown")],
    ids=["small", "at-the-bound", "large", "unknown-size"],
)  # fmt: skip
def test_an_unset_refit_follows_the_training_split_size(
    make_config: Callable[..., TransferConfig], train_size: int | None, refit: bool, reason: str
) -> None:
    plan = compile_plan(make_config("freeze_unfreeze", epochs=3, train_size=train_size))

    assert plan.refit is refit
    assert plan.extra["defaults"]["refit"] is refit
    assert reason in plan.extra["defaults"]["refit_why"]
    # What the spec sets wins, and is not noted as a default.
    for asked in (True, False):
        explicit = compile_plan(
            make_config("freeze_unfreeze", epochs=3, train_size=train_size, refit=asked)
        )
        assert explicit.refit is asked
        assert "refit" not in explicit.extra["defaults"]


def test_an_unset_batch_size_follows_the_modality(
    make_config: Callable[..., TransferConfig],
) -> None:
    image = compile_plan(make_config("fine_tune", batch_size=None))
    text = compile_plan(
        make_config("fine_tune", base_model="minilm_l6", image_size=None, batch_size=None)
    )
    assert (image.batch_size, text.batch_size) == (32, 16)
    assert (
        compile_plan(make_config("fine_tune", base_model="minilm_l6", image_size=None)).batch_size
        == 8
    )
    with pytest.raises(SpecError) as refused:
        compile_plan(make_config("fine_tune", batch_size=None, gpus=3))
    assert refused.value.field == "gpus"


def test_top_k_counts_backbone_groups_from_the_top_and_adds_to_the_others(
    make_config: Callable[..., TransferConfig],
) -> None:
    stages = (
        StageSpec(groups=("top:1",)),
        StageSpec(groups=("top:5",)),
        StageSpec(groups=("stem", "top:1")),
        StageSpec(groups=("top:1", "all")),
        StageSpec(groups=("all", "top:1")),
    )
    plan = compile_plan(make_config(stages=stages))

    assert [stage.trainable_groups for stage in plan.stages] == [
        ("layer4", "head"),
        RESNET_GROUPS,
        ("stem", "layer4", "head"),
        RESNET_GROUPS,
        RESNET_GROUPS,
    ]
    # Unnamed stages are numbered from 1, as a preview lists them.
    assert [stage.name for stage in plan.stages] == [f"stage{n}" for n in range(1, 6)]


def test_solved_head_stages_take_one_epoch_per_grid(
    make_config: Callable[..., TransferConfig],
) -> None:
    plan = compile_plan(make_config("freeze_unfreeze", epochs=6, solve_head=True))

    head, unfreeze = plan.stages
    assert (head.solve, head.epochs, head.c_grid) == (True, 1, HEAD_C_GRID)
    assert (unfreeze.solve, unfreeze.c_grid) == (False, None)
    # A head-only preset's one stage would step for all `epochs`; solved, it fits once.
    (only,) = compile_plan(make_config("feature_extraction", epochs=5, solve_head=True)).stages
    assert (only.solve, only.epochs) == (True, 1)


def test_a_found_learning_rate_scales_the_stages_that_follow_it() -> None:
    # Text `scratch` compiles `lr: auto` at its own default rate (5e-4), not the modality's.
    plan = compile_plan(
        TransferConfig(base_model="minilm_l6", strategy="scratch", num_classes=3, lr="auto")
    )
    compiled = plan.stages[0].group_lrs
    assert set(compiled.values()) == {5e-4}

    found = with_found_lr(plan, 2e-3)

    (stage,) = found.stages
    assert stage.group_lrs == pytest.approx(dict.fromkeys(compiled, 0.002))
    assert stage.auto_lr is False
    assert found.extra == {**plan.extra, "lr": {"auto": 2e-3}}
    assert found.stages[0] == replace(plan.stages[0], group_lrs=stage.group_lrs, auto_lr=False)
    assert replace(found, stages=plan.stages, extra=plan.extra) == plan
    assert not found.needs_lr_finder


def test_a_found_learning_rate_leaves_stages_with_their_own_rate(
    make_config: Callable[..., TransferConfig],
) -> None:
    stages = (StageSpec(groups=("head",)), StageSpec(groups=("all",), lr=0.01))
    plan = compile_plan(make_config(stages=stages, lr="auto"))
    head, everything = plan.stages
    assert head.group_lrs == {"head": 1e-3}

    found = with_found_lr(plan, 4e-3)

    assert found.stages[0].group_lrs == pytest.approx({"head": 4e-3})
    assert found.stages[1] is everything


def test_the_spec_rate_for_a_found_top_rate_is_with_found_lrs_inverse(
    make_config: Callable[..., TransferConfig],
) -> None:
    """`lr_find` reports the spec's `lr` that gives the stage's top group the rate it found."""
    plan = compile_plan(
        TransferConfig(base_model="resnet18", num_classes=3, strategy="fine_tune", lr="auto")
    )
    (stage,) = plan.stages
    assert max(stage.group_lrs.values()) == pytest.approx(1e-4)  # a tenth of `lr` (1e-3)
    assert spec_lr_for(plan, 0, 1e-3) == pytest.approx(1e-2)
    assert max(with_found_lr(plan, 1e-2).stages[0].group_lrs.values()) == pytest.approx(1e-3)

    stages = (StageSpec(groups=("head",)), StageSpec(groups=("all",), lr=0.01))
    own_rate = compile_plan(make_config(stages=stages, lr="auto"))
    assert spec_lr_for(own_rate, 0, 4e-3) == pytest.approx(4e-3)
    assert spec_lr_for(own_rate, 1, 4e-3) is None  # its rate does not follow `lr`


@pytest.mark.parametrize(
    ("settings", "field", "message"),
    [
        (
            {"image_size": 96},
            "image_size",
            "^image_size: minilm_l6 is a text model; image_size is for images$",
        ),
        (
            {"progressive_resizing": (64, 96)},
            "progressive_resizing",
            "^progressive_resizing: minilm_l6 is a text model; progressive_resizing is for images$",
        ),
        (
            {"stages": (StageSpec(groups=("head",)), StageSpec(groups=("all",), image_size=96))},
            "stages[1].image_size",
            r"^stages\[1\]\.image_size: minilm_l6 is a text model; image_size is for images$",
        ),
        (
            {"augment": "light"},
            "augment",
            "^augment: minilm_l6 is a text model; augment is for images$",
        ),
        (
            {"tta": "flip"},
            "tta",
            r"^tta: minilm_l6 is a text model; test-time augmentation \(flips, crops\) is for "
            "images$",
        ),
        (
            {"sampler": "balanced"},
            "sampler",
            "^sampler: minilm_l6 is a text model, whose batches group texts by length; use "
            "class_weights for imbalanced classes$",
        ),
        (
            {"max_length": 257},
            "max_length",
            "^max_length: minilm_l6 reads at most 256 tokens; got 257$",
        ),
    ],
)
def test_a_text_model_refuses_image_settings_by_field(
    settings: dict[str, object], field: str, message: str
) -> None:
    with pytest.raises(SpecError, match=message) as refused:
        compile_plan(TransferConfig(base_model="minilm_l6", num_classes=3, **settings))  # type: ignore[arg-type]
    assert refused.value.field == field


@pytest.mark.parametrize(
    ("settings", "field", "message"),
    [
        (
            {"max_length": 64},
            "max_length",
            "^max_length: resnet18 is an image model; max_length is for text$",
        ),
        ({"lm_epochs": 1}, "lm_epochs", "lm_epochs: resnet18 is an image model"),
        (
            {"tta": "flip", "flip": False},
            "tta",
            "^tta: `flip` with `flip: false` leaves only the original view; use `flip_crops` "
            r"\(crops without mirrors\) or `none`$",
        ),
        (
            {"strategy": "ulmfit"},
            "strategy",
            "^strategy: ulmfit is for text base models; resnet18 takes images$",
        ),
    ],
)
def test_an_image_model_refuses_text_settings_by_field(
    settings: dict[str, object], field: str, message: str
) -> None:
    with pytest.raises(SpecError, match=message) as refused:
        compile_plan(TransferConfig(base_model="resnet18", num_classes=3, **settings))  # type: ignore[arg-type]
    assert refused.value.field == field


@pytest.mark.parametrize(("tta", "flip"), [("flip", True), ("flip_crops", False), ("none", False)])
def test_an_image_model_takes_test_time_views_its_flip_setting_allows(tta: str, flip: bool) -> None:
    config = TransferConfig(base_model="resnet18", num_classes=3, tta=tta, flip=flip)  # type: ignore[arg-type]
    assert compile_plan(config).tta == tta


def test_a_text_plans_length_defaults_to_the_modalitys_and_takes_up_to_the_models() -> None:
    def length(**settings: object) -> int | None:
        config = TransferConfig(base_model="minilm_l6", num_classes=3, **settings)  # type: ignore[arg-type]
        return TextPreprocessing.of(compile_plan(config)).max_length

    assert length() == 128
    assert length(max_length=64) == 64
    assert length(max_length=256) == 256  # the model's own maximum is allowed
    assert length(augment="none") == 128  # "none" is no image setting
    config = TransferConfig(base_model="minilm_l6", num_classes=3)
    plan = compile_plan(config)
    assert plan.preprocessing == TextPreprocessing(max_length=128, truncation="head")
    assert plan.old_tasks == ()
    chosen = compile_plan(replace(config, truncation="head_tail"))
    assert TextPreprocessing.of(chosen).truncation == "head_tail"


def test_a_text_parent_passes_on_its_length_and_truncation_unless_the_spec_sets_them() -> None:
    parent_plan = compile_plan(
        TransferConfig(base_model="minilm_l6", num_classes=3, max_length=64, truncation="head_tail")
    )
    parent = ParentModel(
        location="models/1",
        config=ModelConfig(tasks=(), preprocessing=None, plan=parent_plan.to_dict()),
    )
    child = TransferConfig(
        base_model="minilm_l6", strategy="fine_tune", num_classes=2, parent=parent
    )

    inherited = compile_plan(child)
    assert (inherited.modality, inherited.parent) == ("text", "models/1")
    assert inherited.stages[-1].image_size is None
    assert inherited.preprocessing == TextPreprocessing(max_length=64, truncation="head_tail")
    own = compile_plan(replace(child, max_length=32, truncation="head"))
    assert own.preprocessing == TextPreprocessing(max_length=32, truncation="head")
    with pytest.raises(SpecError, match=r"^image_size: minilm_l6 is a text model"):
        compile_plan(replace(child, image_size=96))


def test_a_stage_without_its_own_size_takes_the_models(
    make_config: Callable[..., TransferConfig],
) -> None:
    stages = (
        StageSpec(groups=("head",)),
        StageSpec(groups=("all",), lrs=dict.fromkeys(RESNET_GROUPS, 1e-3)),
    )
    plan = compile_plan(make_config(stages=stages, lr="auto"))

    assert [stage.image_size for stage in plan.stages] == [64, 64]
    # Rates given per group are the stage's own: the finder's rate does not scale them.
    assert [stage.auto_lr for stage in plan.stages] == [True, False]


def test_a_solved_stage_steps_once_per_l2_strength(
    make_config: Callable[..., TransferConfig],
) -> None:
    plan = compile_plan(make_config("freeze_unfreeze", epochs=3, solve_head=True, train_size=40))
    head, unfreeze = plan.stages

    assert steps_per_epoch(plan, head, 40) == len(HEAD_C_GRID)
    assert steps_per_epoch(plan, unfreeze, 40) == 5  # 40 items in batches of 8


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"num_classes": 1}, "num_classes", "num_classes must be at least 2; got 1"),
        ({"train_size": 0}, "train_size", "train_size must be at least 1; got 0"),
        (
            {"image_size": None, "progressive_resizing": (96, 64)},
            "progressive_resizing",
            "progressive_resizing must be strictly increasing sizes between 64 and 1024; "
            "got (96, 64)",
        ),
        (
            {"image_size": 96, "progressive_resizing": (64, 128)},
            "progressive_resizing",
            "progressive_resizing must end at image_size 96; got (64, 128)",
        ),
        (
            {"base_model": "vit_b_16", "image_size": 224, "progressive_resizing": (128, 224)},
            "progressive_resizing",
            "progressive_resizing: vit_b_16 only accepts 224px images",
        ),
        (
            {"head_epochs": 1},
            "head_epochs",
            "head_epochs only applies to the freeze_unfreeze and lwf strategies",
        ),
        ({"lora_rank": 4}, "lora_rank", "lora_rank only applies to the lora strategy"),
        ({"stages": ()}, "stages", "stages must list at least one stage when given"),
        (
            {"batch_size": 9, "gpus": 2},
            "gpus",
            "gpus: batch_size 9 does not split evenly over 2 processes; choose a batch_size "
            "that is a multiple of 2",
        ),
    ],
)
def test_a_refused_config_names_its_field_and_says_why(
    make_config: Callable[..., TransferConfig],
    overrides: dict[str, object],
    field: str,
    message: str,
) -> None:
    # The API points its 422 at `field` without reading the message: both are what a user sees.
    with pytest.raises(SpecError) as refused:
        compile_plan(make_config(**overrides))
    assert (refused.value.field, str(refused.value)) == (field, message)


def test_a_strategy_that_compiles_its_own_stages_refuses_written_ones() -> None:
    with pytest.raises(SpecError) as refused:
        compile_plan(
            TransferConfig(
                base_model="minilm_l6",
                strategy="ulmfit",
                num_classes=3,
                stages=(StageSpec(groups=("head",)),),
            )
        )
    assert (refused.value.field, str(refused.value)) == (
        "stages",
        "the ulmfit strategy compiles its own stages; drop stages",
    )


def test_a_lora_plan_records_its_rank_from_the_models_family(
    make_config: Callable[..., TransferConfig],
) -> None:
    # Mostly pointwise-convolution nets get rank 4, the others 8; alpha is twice the rank.
    for base_model, rank in (("efficientnet_lite0", 4), ("resnet18", 8)):
        plan = compile_plan(make_config("lora", base_model=base_model, pretrained=True))
        assert plan.extra["lora"] == {
            "rank": rank,
            "alpha": 2.0 * rank,
            "dropout": 0.0,
            "targets": None,
        }
        assert plan.stages[0].trainable_groups == ("adapter", "head")
    assert "lora" not in compile_plan(make_config("fine_tune")).extra
    # Written stages may name the adapters' group, and `all` includes it.
    stages = (StageSpec(groups=("adapter", "head")), StageSpec(groups=("all",)))
    written = compile_plan(make_config("lora", pretrained=True, stages=stages))
    assert [stage.trainable_groups for stage in written.stages] == [
        ("adapter", "head"),
        (*RESNET_GROUPS[:-1], "adapter", "head"),
    ]


def test_a_plan_records_the_preset_defaults_it_applied() -> None:
    def extra(**settings: Any) -> dict[str, Any]:
        config = TransferConfig(base_model="minilm_l6", num_classes=3, **settings)
        return compile_plan(config).extra

    assert extra(strategy="scratch")["preset_defaults"] == {"lr": 5e-4, "schedule": "one_cycle"}
    # What the spec sets is the spec's, not the preset's.
    assert extra(strategy="scratch", lr=1e-3)["preset_defaults"] == {"schedule": "one_cycle"}
    assert extra(strategy="ulmfit")["preset_defaults"] == {"lm_epochs": 0}
    assert "preset_defaults" not in extra(strategy="scratch", lr=1e-3, schedule="cosine")
    assert "preset_defaults" not in extra(strategy="feature_extraction")


def test_ulmfit_unfreezes_at_its_own_lr_decay_and_its_presets_lm_epochs() -> None:
    plan = compile_plan(TransferConfig(base_model="minilm_l6", strategy="ulmfit", num_classes=3))

    # The text preset has no masked-LM stage; ULMFiT's lr_decay of 2.6 (not text's 1.2)
    # spaces the rates of the groups it unfreezes.
    assert [stage.name for stage in plan.stages][:3] == ["head", "unfreeze_top_1", "unfreeze_top_2"]
    rates = plan.stages[2].group_lrs
    assert rates["head"] / rates["layer.5"] == pytest.approx(2.6)
    assert rates["layer.5"] / rates["layer.4"] == pytest.approx(2.6)
    with_lm = compile_plan(
        TransferConfig(base_model="minilm_l6", strategy="ulmfit", num_classes=3, lm_epochs=1)
    )
    assert with_lm.stages[0].name == "masked_lm"


def test_a_plan_from_a_parent_records_the_parent_and_one_from_the_zoo_does_not(
    make_config: Callable[..., TransferConfig], parent_dir: Path
) -> None:
    chained = compile_plan(
        make_config("fine_tune", base_model="model:shapes:1", parent_dir=parent_dir)
    )

    assert chained.extra["parent"] == "model:shapes:1"
    assert "parent" not in compile_plan(make_config("fine_tune")).extra


def test_a_pretrained_spec_gives_a_pretrained_plan_unless_the_strategy_starts_from_scratch(
    make_config: Callable[..., TransferConfig],
) -> None:
    assert compile_plan(make_config("fine_tune", pretrained=True)).pretrained is True
    assert compile_plan(make_config("fine_tune", pretrained=False)).pretrained is False
    assert compile_plan(make_config("scratch", pretrained=True)).pretrained is False


def test_a_single_training_item_is_enough_to_compile_a_plan(
    make_config: Callable[..., TransferConfig],
) -> None:
    # One item is one step a pass: the 2-epoch head stage makes 25 passes for its 50 steps.
    plan = compile_plan(make_config(train_size=1))

    assert [stage.passes for stage in plan.stages] == [25]
