"""What a preset does where the spec is silent, on the modality of the base model.

A modality's rates for the transfer presets are its `Modality.defaults`; the exceptions a
preset needs on one modality are its `Modality.presets` (a `PresetDefaults` per strategy),
measured with `bench/text_quality.py` (text) and `bench/quality.py` (images). `compile_plan`
puts the preset's on the plan's `Base` (`Base.preset`), the plan records what it applied
(`Plan.extra["preset_defaults"]`) and the preview shows the resolved stages.

Standard library only, like `spec`.
"""

from dataclasses import asdict, dataclass
from typing import Any

from .spec import ModalityDefaults, Schedule

DEFAULT_SCHEDULE: Schedule = "cosine"


@dataclass(frozen=True)
class PresetDefaults:
    """A preset's own defaults on one modality; None: the modality's (or the spec's) default."""

    lr: float | None = None
    """The spec's `lr`: the head's rate on a frozen backbone, and `scratch`'s rate for every
    group (it has no pretrained layers to protect)."""
    schedule: Schedule | None = None
    """The schedule of the preset's stages that do not fix their own (`gradual_unfreeze` and
    `ulmfit` always use slanted triangular rates)."""
    lm_epochs: int | None = None
    """ulmfit: epochs of the masked-LM stage (None: none)."""
    head_boost: float | None = None
    """In stages that train the backbone at rates derived from `lr`: the new head's rate is
    this many times the top of the discriminative ladder (`lr * fine_tune_lr_factor`), since a
    head from random weights needs larger steps than pretrained layers. Not a spec setting:
    a spec's `stages` with their own `lr` or `lrs` get exactly those rates."""


def default_lr(defaults: ModalityDefaults, preset: PresetDefaults) -> float:
    """The rate a spec without `lr` gets (and `lr: auto` is compiled at before the finder)."""
    return defaults.lr if preset.lr is None else preset.lr


def applied_defaults(preset: PresetDefaults, spec: Any) -> dict[str, Any]:
    """The preset's own defaults that `spec` (a `TransferSettings`) leaves in force, as the
    plan records them: empty when the preset has none or the spec sets them all."""
    return {
        name: value
        for name, value in asdict(preset).items()
        if value is not None and getattr(spec, name, None) is None
    }
