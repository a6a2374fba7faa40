from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from worker.engine import (
    HeadConfig,
    TransferConfig,
    build_model,
    compile_plan,
    describe_plan,
    freeze,
    get_base_model_info,
    make_param_groups,
    preview_plan,
    set_batchnorm_mode,
)


def _batchnorm_modes(model: nn.Module) -> dict[str, bool]:
    return {
        name: module.training
        for name, module in model.named_modules()
        if isinstance(module, nn.BatchNorm2d)
    }


def test_head_layers(make_config: Callable[..., TransferConfig]) -> None:
    plan = compile_plan(make_config(head=HeadConfig(hidden=(64,), dropout=0.25)))
    model = build_model(plan, weights_dir=None)

    assert [type(layer) for layer in model.head] == [
        nn.Dropout,
        nn.Linear,
        nn.ReLU,
        nn.Dropout,
        nn.Linear,
    ]
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 3)
    assert [name for name, _ in model.groups()][-1] == "head"


def test_frozen_groups_keep_batchnorm_in_eval_after_train(
    make_config: Callable[..., TransferConfig],
) -> None:
    plan = compile_plan(make_config("fine_tune", bn_mode="train"))
    model = build_model(plan, weights_dir=None)
    stage = plan.stages[0]
    partial = replace(stage, trainable_groups=("layer4", "head"))

    freeze(model, partial.trainable_groups)
    set_batchnorm_mode(model, partial)
    model.train()

    modes = _batchnorm_modes(model)
    assert modes
    assert all(modes[name] == name.startswith("backbone.net.layer4.") for name in modes)
    assert all(
        p.requires_grad == name.startswith(("backbone.net.layer4.", "head."))
        for name, p in model.named_parameters()
    )

    set_batchnorm_mode(model, stage)
    model.train()
    assert all(_batchnorm_modes(model).values())


def test_bn_mode_frozen_freezes_every_batchnorm(
    make_config: Callable[..., TransferConfig],
) -> None:
    plan = compile_plan(make_config("fine_tune", bn_mode="frozen"))
    model = build_model(plan, weights_dir=None)

    set_batchnorm_mode(model, plan.stages[0])
    model.train()

    assert not any(_batchnorm_modes(model).values())
    assert model.head.training


def test_param_groups_follow_the_stage(make_config: Callable[..., TransferConfig]) -> None:
    plan = compile_plan(make_config("fine_tune", lr=0.01))
    model = build_model(plan, weights_dir=None)
    stage = plan.stages[0]
    freeze(model, stage.trainable_groups)

    groups = make_param_groups(model, stage)

    assert [group["name"] for group in groups] == list(stage.trainable_groups)
    assert {group["name"]: group["lr"] for group in groups} == stage.group_lrs
    layer1 = next(group for group in groups if group["name"] == "layer1")
    assert {id(p) for p in layer1["params"]} == {
        id(p) for p in model.backbone.net.get_submodule("layer1").parameters()
    }
    assert sum(len(group["params"]) for group in groups) == len(list(model.parameters()))


def test_chained_transfer_starts_from_the_parents_backbone(
    make_config: Callable[..., TransferConfig], parent_dir: Path
) -> None:
    parent = load_file(parent_dir / "weights.safetensors")
    plan = compile_plan(make_config("fine_tune", parent_dir=parent_dir, pretrained=True))

    model = build_model(plan, weights_dir=None, parent_dir=parent_dir)

    backbone = model.backbone.state_dict()
    assert backbone
    assert all(torch.equal(parent[f"backbone.{k}"], v) for k, v in backbone.items())
    assert model.head[-1].out_features == 3
    assert len(model.old_heads) == 0
    groups = [name for name, _ in model.groups()]
    assert groups == [*get_base_model_info("resnet18").group_names, "head"]


def test_lwf_model_keeps_the_parents_head_beside_a_new_one(
    make_config: Callable[..., TransferConfig], parent_dir: Path
) -> None:
    parent = load_file(parent_dir / "weights.safetensors")
    plan = compile_plan(make_config("lwf", parent_dir=parent_dir, pretrained=True))

    model = build_model(plan, weights_dir=None, parent_dir=parent_dir)
    old, new = model.forward_tasks(torch.zeros(2, 3, 64, 64))

    assert (old.shape, new.shape) == ((2, 2), (2, 3))
    old_head = model.old_heads[0].state_dict()
    assert all(torch.equal(parent[f"head.{k}"], v) for k, v in old_head.items())
    assert [name for name, _ in model.groups()][-2:] == ["old_heads", "head"]
    image = torch.zeros(1, 3, 64, 64)
    assert torch.equal(model.eval()(image), model.forward_tasks(image)[1])


def test_a_plan_with_a_parent_needs_the_parents_folder(
    make_config: Callable[..., TransferConfig], parent_dir: Path
) -> None:
    plan = compile_plan(make_config("fine_tune", parent_dir=parent_dir, pretrained=True))

    with pytest.raises(ValueError, match="pass its folder as parent_dir"):
        build_model(plan, weights_dir=None)


def test_the_preview_counts_on_the_meta_device(
    make_config: Callable[..., TransferConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = compile_plan(make_config("fine_tune"))
    real = describe_plan(plan, build_model(plan, weights_dir=None, pretrained=False))
    # No weights are drawn: a random initialisation during the preview fails the test.
    monkeypatch.setattr(nn.init, "kaiming_normal_", _no_initialisation)
    monkeypatch.setattr(nn.init, "normal_", _no_initialisation)
    assert preview_plan(plan, weights_dir=None) == real


def _no_initialisation(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    assert tensor.is_meta, "the preview initialised real weights"
    return tensor
