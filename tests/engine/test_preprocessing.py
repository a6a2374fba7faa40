"""A plan's preprocessing is one field of its modality's own kind (`Plan.preprocessing`), tagged
with the modality on the wire; plans stored before that (their preprocessing as the plan's own
fields) still read."""

import json
from typing import Any

import pytest

from worker.engine import TransferConfig, compile_plan
from worker.engine.modalities.image.preprocessing import ImagePreprocessing
from worker.engine.modalities.text.preprocessing import TextPreprocessing
from worker.engine.stages import FLAT_PREPROCESSING, Plan

# As `Plan.to_dict` wrote them before `preprocessing` was one field (commit 58b2b5d):
# stored with jobs and versions in databases and in published versions' config.json.
OLD_IMAGE_PLAN: dict[str, Any] = {
    "seed": 0, "batch_size": 32, "optimizer": "adamw", "weight_decay": 0.01,
    "label_smoothing": 0.0, "class_weights": "none", "sampler": "shuffle",
    "early_stopping_patience": None, "augment": "none", "flip": True, "tta": "none",
    "ema": None, "feature_views": 4, "device": "cpu", "gpus": 1, "lwf_temperature": 2.0,
    "lwf_lambda": 1.0, "amp": True, "amp_cpu": False, "refit": False,
    "base_model": "resnet18", "num_classes": 2, "head": {"hidden": [], "dropout": 0.0},
    "stages": [
        {"name": "head", "trainable_groups": ["head"], "group_lrs": {"head": 0.001},
         "epochs": 1, "schedule": "cosine", "bn_mode": "frozen", "image_size": 64,
         "cache_features": True, "distill": False, "objective": "classify",
         "auto_lr": False, "passes": 1, "solve": True,
         "c_grid": [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0]},
        {"name": "unfreeze",
         "trainable_groups": ["stem", "layer1", "layer2", "layer3", "layer4", "head"],
         "group_lrs": {"stem": 8.416533573215762e-07, "layer1": 2.188298729036098e-06,
                       "layer2": 5.689576695493855e-06, "layer3": 1.4792899408284024e-05,
                       "layer4": 3.846153846153846e-05, "head": 0.0001},
         "epochs": 1, "schedule": "cosine", "bn_mode": "frozen", "image_size": 64,
         "cache_features": False, "distill": False, "objective": "classify",
         "auto_lr": False, "passes": 1, "solve": False, "c_grid": None},
    ],
    "pretrained": True, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
    "parent": None, "modality": "image", "max_length": None, "truncation": None,
    "task_name": "main", "old_tasks": [],
    "extra": {"strategy": "freeze_unfreeze"},
}  # fmt: skip
OLD_TEXT_PLAN: dict[str, Any] = {
    "seed": 0, "batch_size": 16, "optimizer": "adamw", "weight_decay": 0.01,
    "label_smoothing": 0.0, "class_weights": "none", "sampler": "shuffle",
    "early_stopping_patience": None, "augment": "none", "flip": True, "tta": "none",
    "ema": None, "feature_views": 4, "device": "cpu", "gpus": 1, "lwf_temperature": 2.0,
    "lwf_lambda": 1.0, "amp": True, "amp_cpu": False, "refit": False,
    "base_model": "minilm_l6", "num_classes": 2, "head": {"hidden": [], "dropout": 0.0},
    "stages": [
        {"name": "fine_tune",
         "trainable_groups": ["embeddings", "layer.0", "layer.1", "layer.2", "layer.3",
                              "layer.4", "layer.5", "head"],
         "group_lrs": {"embeddings": 2.7908164723365347e-05, "layer.0": 3.348979766803842e-05,
                       "layer.1": 4.0187757201646104e-05, "layer.2": 4.822530864197531e-05,
                       "layer.3": 5.787037037037038e-05, "layer.4": 6.944444444444444e-05,
                       "layer.5": 8.333333333333334e-05, "head": 0.001},
         "epochs": 1, "schedule": "slanted_triangular", "bn_mode": "frozen",
         "image_size": None, "cache_features": False, "distill": False,
         "objective": "classify", "auto_lr": False, "passes": 1, "solve": False,
         "c_grid": None},
    ],
    "pretrained": True, "mean": [0.0, 0.0, 0.0], "std": [0.0, 0.0, 0.0], "parent": None,
    "modality": "text", "max_length": 64, "truncation": "head_tail", "task_name": "main",
    "old_tasks": [],
    "extra": {"strategy": "fine_tune",
              "preset_defaults": {"schedule": "slanted_triangular", "head_boost": 10.0}},
}  # fmt: skip


@pytest.mark.parametrize(
    ("stored", "preprocessing"),
    [
        (OLD_IMAGE_PLAN, ImagePreprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))),
        (OLD_TEXT_PLAN, TextPreprocessing(max_length=64, truncation="head_tail")),
    ],
    ids=["image", "text"],
)
def test_a_plan_stored_with_flat_preprocessing_fields_reads_as_one_tagged_field(
    stored: dict[str, Any], preprocessing: Any
) -> None:
    plan = Plan.from_dict(json.loads(json.dumps(stored)))

    assert plan.preprocessing == preprocessing
    assert plan.modality == stored["modality"]
    assert [stage.image_size for stage in plan.stages] == [
        stage["image_size"] for stage in stored["stages"]
    ]
    written = json.loads(json.dumps(plan.to_dict()))
    assert not set(FLAT_PREPROCESSING) & set(written)
    assert written["preprocessing"] == {"modality": stored["modality"], **_fields(preprocessing)}
    # Readers of stored plans (older thaw, a version's plan read as data) find it there too.
    assert written["modality"] == stored["modality"]
    assert Plan.from_dict(json.loads(json.dumps(written))) == plan


def _fields(preprocessing: Any) -> dict[str, Any]:
    fields: dict[str, Any] = json.loads(json.dumps(vars(preprocessing)))
    return fields


def test_an_old_image_plan_without_a_modality_reads_as_an_image_plan() -> None:
    stored = {
        name: value
        for name, value in OLD_IMAGE_PLAN.items()
        if name not in ("modality", "max_length", "truncation")
    }
    plan = Plan.from_dict(stored)
    assert (plan.modality, plan.preprocessing) == (
        "image",
        ImagePreprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    )


def test_an_old_text_plan_without_truncation_reads_with_the_default_head() -> None:
    stored = {name: value for name, value in OLD_TEXT_PLAN.items() if name != "truncation"}
    assert Plan.from_dict(stored).preprocessing == TextPreprocessing(64, "head")


def test_a_text_plan_on_the_wire_has_no_pixel_statistics_and_an_image_plan_no_tokens() -> None:
    text = compile_plan(TransferConfig(base_model="minilm_l6", num_classes=2, max_length=32))
    image = compile_plan(TransferConfig(base_model="resnet18", num_classes=2, image_size=64))

    assert _json(text)["preprocessing"] == {
        "modality": "text",
        "max_length": 32,
        "truncation": "head",
    }
    assert _json(image)["preprocessing"] == {
        "modality": "image",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }
    assert '"mean"' not in json.dumps(text.to_dict())
    assert '"max_length"' not in json.dumps(image.to_dict())
    for plan in (text, image):
        assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def _json(plan: Plan) -> dict[str, Any]:
    written: dict[str, Any] = json.loads(json.dumps(plan.to_dict()))
    return written


def test_preprocessing_of_another_modality_is_refused() -> None:
    stored = compile_plan(TransferConfig(base_model="resnet18", num_classes=2)).to_dict()
    stored["preprocessing"] = {"modality": "text", "max_length": 32, "truncation": "head"}
    with pytest.raises(ValueError, match="image plans have no text preprocessing"):
        Plan.from_dict(stored)
    image = Plan.from_dict(OLD_IMAGE_PLAN)
    with pytest.raises(ValueError, match="image plans have no text preprocessing"):
        TextPreprocessing.of(image)


def test_a_plans_modality_is_its_preprocessings_tag() -> None:
    stored = compile_plan(TransferConfig(base_model="minilm_l6", num_classes=2)).to_dict()
    del stored["modality"]
    plan = Plan.from_dict(stored)
    assert (plan.modality, plan.preprocessing) == ("text", TextPreprocessing(128, "head"))
