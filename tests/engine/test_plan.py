import json
from collections.abc import Callable

import pytest

from worker.engine import (
    HeadConfig,
    Plan,
    TransferConfig,
    UnknownBaseModelError,
    build_model,
    compile_plan,
    describe_plan,
    get_base_model_info,
)

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

    assert plan.image_size == 224
    assert plan.mean == get_base_model_info("efficientnet_lite0").mean


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
