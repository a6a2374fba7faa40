"""`lora`: adapters through peft on a frozen backbone, published as adapters + heads only."""

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from worker.engine import (
    ParentModel,
    Predictor,
    Sample,
    TrainingResult,
    TransferConfig,
    build_model,
    compile_plan,
    describe_plan,
    export_model,
    freeze,
    preprocess,
    run,
)
from worker.engine.export import WEIGHTS_FILE
from worker.engine.modalities.image.preprocessing import ImagePreprocessing
from worker.engine.model import load_exported
from worker.engine.onnx_export import export_onnx
from worker.engine.plan import Plan

Data = tuple[list[Sample], list[Sample]]
CLASSES = ["red", "green", "blue"]


def _lora_config(**overrides: object) -> TransferConfig:
    settings: dict[str, object] = {
        "base_model": "efficientnet_lite0",
        "strategy": "lora",
        "num_classes": 3,
        "image_size": 64,
        "epochs": 1,
        "batch_size": 8,
        "lr": 0.01,
        **overrides,
    }
    return TransferConfig(**settings)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def published(
    colour_data: Data, tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainingResult, Plan, Path, torch.Tensor, torch.Tensor]:
    """A lora run exported; the val logits of the trained model before and after the merge."""
    plan = compile_plan(_lora_config())
    train, val = colour_data
    result = run(plan, train=train, val=val, classes=CLASSES)
    batch = _batch(val, plan)
    with torch.no_grad():
        before = result.model.eval()(batch)
    out = tmp_path_factory.mktemp("lora")
    export_model(result, plan, out)
    with torch.no_grad():
        after = result.model.eval()(batch)
    return result, plan, out, before, after


def _batch(samples: list[Sample], plan: Plan) -> torch.Tensor:
    from PIL import Image

    pixels = ImagePreprocessing.of(plan)
    return torch.stack(
        [
            preprocess(Image.open(s.path), image_size=64, mean=pixels.mean, std=pixels.std)
            for s in samples
        ]
    )


def test_lora_trains_the_adapters_and_head_only_and_the_preview_counts_them() -> None:
    plan = compile_plan(_lora_config())
    assert plan.extra["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": None}
    model = build_model(plan, weights_dir=None)
    layers = [m for m in model.backbone.modules() if isinstance(m, LoraLayer)]
    # The zoo's default for EfficientNet-Lite: every pointwise convolution narrowing channels.
    convs = [layer.get_base_layer() for layer in layers]
    assert convs
    assert all(c.kernel_size == (1, 1) and c.out_channels < c.in_channels for c in convs)
    (stage,) = describe_plan(plan, model)
    groups = {group["name"]: group["parameters"] for group in stage["trainable_groups"]}
    # A rank-4 adapter on a 1x1 convolution is A (4 x in) and B (out x 4).
    assert groups["adapter"] == sum(4 * (c.in_channels + c.out_channels) for c in convs)
    assert groups["head"] == 1280 * 3 + 3
    base = sum(p.numel() for p in model.parameters()) - groups["adapter"] - groups["head"]
    assert stage["total_parameters"] == base + groups["adapter"] + groups["head"]
    assert stage["trainable_parameters"] / stage["total_parameters"] <= 0.03
    freeze(model, plan.stages[0].trainable_groups)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == stage["trainable_parameters"]


def test_lora_settings_belong_to_lora_and_targets_must_exist() -> None:
    with pytest.raises(ValueError, match="lora_rank only applies to the lora strategy"):
        compile_plan(_lora_config(strategy="fine_tune", lora_rank=4))
    plan = compile_plan(_lora_config(lora_targets=("conv_head",), lora_rank=2))
    model = build_model(plan, weights_dir=None)
    assert [n for n, m in model.backbone.named_modules() if isinstance(m, LoraLayer)] == [
        "net.conv_head"
    ]
    with pytest.raises(ValueError, match="lora_targets: no module of efficientnet_lite0"):
        build_model(compile_plan(_lora_config(lora_targets=("nothing",))), weights_dir=None)


def test_a_lora_version_stores_adapters_and_heads_and_serves_merged(
    published: tuple[TrainingResult, Plan, Path, torch.Tensor, torch.Tensor],
    colour_data: Data,
    tmp_path: Path,
) -> None:
    result, plan, out, before, after = published
    stored = load_file(out / WEIGHTS_FILE)
    assert stored
    assert all("lora_" in k or k.startswith("head.") for k in stored)
    full = sum(t.numel() * t.element_size() for t in result.model.state_dict().values())
    assert (out / WEIGHTS_FILE).stat().st_size <= 0.10 * full
    # Merged: plain modules computing what the adapters did.
    assert not any(isinstance(m, LoraLayer) for m in result.model.modules())
    assert torch.allclose(before, after, atol=1e-5)
    # Loaded over the base model's pretrained weights, it answers as the trained model.
    with torch.no_grad():
        reloaded = Predictor.load(out).model(_batch(colour_data[1], plan))
    assert torch.allclose(reloaded, after, atol=1e-5)
    onnx = export_onnx(result.model, image_size=64, out_path=tmp_path / "model.onnx")
    assert onnx.exported, onnx.reason


def test_chaining_and_lwf_start_from_a_lora_version(
    published: tuple[TrainingResult, Plan, Path, torch.Tensor, torch.Tensor],
    colour_data: Data,
    make_config: Callable[..., TransferConfig],
) -> None:
    _, _, out, _, _ = published
    merged = load_exported(out).state_dict()
    config = make_config(
        "lwf",
        base_model="efficientnet_lite0",
        parent=ParentModel.from_folder(out),
        pretrained=True,
        task_name="again",
    )
    plan = compile_plan(config)
    model = build_model(plan, weights_dir=None, parent_dir=out)
    state = model.state_dict()
    for name, tensor in merged.items():
        kept = name if name.startswith("backbone.") else name.replace("head.", "old_heads.0.", 1)
        assert torch.equal(state[kept], tensor), name
    train, val = colour_data
    result = run(plan, train=train, val=val, classes=CLASSES, parent_dir=out)
    assert [entry.stage for entry in result.history] == ["head", "joint"]
