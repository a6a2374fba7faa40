"""The base models thaw can transfer from: what every modality's zoo hands out (`Backbone`,
`BaseModelInfo`, the lookup errors), and the lookups by name, which ask the modality whose
zoo holds the name (`modalities/image/zoo.py`, `modalities/text/zoo.py`).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .modalities import MODALITIES, modality_of_base_model
from .modalities.base import ModelInput

POINTWISE = "pointwise"
"""A `lora_targets` entry meaning every pointwise projection: a 1x1 convolution (groups 1)
that narrows the channels, as the blocks of EfficientNet and MobileNet end with."""
ATTENTION = ("query", "key", "value", "q_lin", "k_lin", "v_lin", "qkv", "out_proj")
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "efficientnet_lite": (POINTWISE,),
    "efficientnet": (POINTWISE,),
    "mobilenet_v3": (POINTWISE,),
    # Basic blocks have no 1x1 convolution besides the shortcut; their second 3x3 is adapted.
    "resnet": ("conv2",),
    "vgg": ("classifier.0", "classifier.3"),
    # ConvNeXt's pointwise layers are Linear (the block's expansion and projection).
    "convnext": ("block.3", "block.5"),
    # torchvision's ViT packs query/key/value into one parameter; its output projection and
    # the MLP are modules.
    "vit": ("out_proj", "mlp.0", "mlp.3"),
}
"""`lora`: the modules an adapter wraps by default, per family, as module-name suffixes (or
`pointwise`). BERT-family encoders (every text family) adapt their attention projections;
a family not listed here (timm's) adapts its attention projections, or else its pointwise
projections."""


class WeightsUnavailableError(Exception):
    """Pretrained weights were requested but their file is not where thaw looks for it."""


class UnknownBaseModelError(ValueError):
    """The base model name is not in the zoo."""


@dataclass(frozen=True)
class BaseModelInfo:
    name: str
    family: str
    source: str
    feature_dim: int
    group_names: tuple[str, ...]
    """Backbone parameter groups, input to output; the classifier head is not one of them."""
    preprocessing: ModelInput
    """What the model reads, of its modality's own type (`ModelInput.of` narrows it): an
    image model's input size and pixel statistics, a text model's token limit and pooling."""

    @property
    def modality(self) -> str:
        """A name in the modality registry (`modalities.MODALITIES`)."""
        return self.preprocessing.modality


class _Loose(nn.Module):
    """Presents a parameter that lives directly on a module (a class token) as a group member;
    it shares the parameter, so freezing or optimising it acts on the network's tensor."""

    def __init__(self, parameter: nn.Parameter) -> None:
        super().__init__()
        self.value = parameter


class Backbone(nn.Module):
    """A zoo network without its classifier: `forward` returns pooled (B, feature_dim)."""

    def __init__(
        self, info: BaseModelInfo, net: nn.Module, group_paths: tuple[tuple[str, ...], ...]
    ) -> None:
        super().__init__()
        self.info = info
        self.net = net
        self._group_paths = group_paths

    def forward(self, x: Tensor) -> Tensor:
        features: Tensor = self.net(x)
        return features

    def _member(self, path: str) -> nn.Module:
        try:
            return self.net.get_submodule(path)
        except AttributeError:
            return _Loose(self.net.get_parameter(path))

    def groups(self) -> list[tuple[str, list[nn.Module]]]:
        """Parameter groups in input-to-output order."""
        return [
            (name, [self._member(path) for path in paths])
            for name, paths in zip(self.info.group_names, self._group_paths, strict=True)
        ]

    def adapter_targets(self, wanted: tuple[str, ...] | None) -> list[str]:
        """Full names of the modules a LoRA adapter wraps: those `wanted` names (module-name
        suffixes, or `pointwise`), else the family's `LORA_TARGETS`."""
        if wanted is None:
            wanted = LORA_TARGETS.get(self.info.family)
        if wanted is None:
            wanted = ATTENTION if self._named(ATTENTION) else (POINTWISE,)
        found = self._named(tuple(name for name in wanted if name != POINTWISE))
        if POINTWISE in wanted:
            found += [
                name
                for name, module in self.named_modules()
                if isinstance(module, nn.Conv2d)
                and module.kernel_size == (1, 1)
                and module.groups == 1
                and module.out_channels < module.in_channels
            ]
        if not found:
            raise ValueError(
                f"lora_targets: no module of {self.info.name} matches {', '.join(wanted)}"
            )
        return sorted(set(found))

    def _named(self, suffixes: tuple[str, ...]) -> list[str]:
        return [
            name
            for name, module in self.named_modules()
            if isinstance(module, nn.Linear | nn.Conv2d)
            and any(name == suffix or name.endswith(f".{suffix}") for suffix in suffixes)
        ]

    def make_lm_head(self) -> nn.Module:
        """A masked-LM head over this backbone's tokens (text backbones override this)."""
        raise ValueError(f"{self.info.name} reads {self.info.modality}s; it has no language model")


def get_base_model_info(name: str) -> BaseModelInfo:
    return modality_of_base_model(name).base_model_info(name)


def weights_available(name: str, weights_dir: Path | None) -> bool:
    return modality_of_base_model(name).weights_available(name, weights_dir)


def build_backbone(name: str, *, pretrained: bool, weights_dir: Path | None) -> Backbone:
    """Build a zoo backbone; with `pretrained`, missing weights raise instead of random init."""
    return modality_of_base_model(name).build_backbone(
        name, pretrained=pretrained, weights_dir=weights_dir
    )


def list_base_models(weights_dir: Path | None) -> list[dict[str, Any]]:
    """Describe every base model of every modality, including whether its weights can be
    found right now."""
    return [model for m in MODALITIES for model in m.list_base_models(weights_dir)]
