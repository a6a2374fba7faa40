"""What a preset does where the spec is silent, per modality of the base model.

`spec.MODALITY_DEFAULTS` holds a modality's rates for the transfer presets; this table holds
the exceptions a preset needs on one modality, measured with `bench/text_quality.py` (text)
and `bench/quality.py` (images). `compile_plan` reads it through `preset_defaults`, the plan
records what it applied (`Plan.extra["defaults"]`) and the preview shows the resolved stages.

Standard library only, like `spec`.
"""

from dataclasses import asdict, dataclass
from typing import Any

from .spec import MODALITY_DEFAULTS, Schedule

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


PRESET_DEFAULTS: dict[tuple[str, str], PresetDefaults] = {
    # A transformer from random weights stayed at chance at the text head rate (2e-3) with
    # cosine decay and no warm-up; one-cycle (30 % warm-up, then cosine annealing) at 5e-4,
    # every layer alike, trains it. 1e-3 (linear scaling from a script's batch 16 to thaw's
    # 32) did worse on bench/text_quality.py: 0.30-0.37 against 0.49 on the descriptions.
    ("text", "scratch"): PresetDefaults(lr=5e-4, schedule="one_cycle"),
    # Fine-tuning BERT-family encoders wants a warm-up before the peak rate (Devlin et al.
    # 2019, Mosbach et al. 2021): slanted triangular rates warm up over the first 10 % of the
    # steps, then decay linearly. The head, from random weights, trains at 1e-3 over an
    # encoder at 1e-4 (top layer) to 3e-5 (embeddings), as a careful script's 1e-3 over 5e-5.
    ("text", "fine_tune"): PresetDefaults(schedule="slanted_triangular", head_boost=10.0),
    ("text", "partial"): PresetDefaults(schedule="slanted_triangular", head_boost=10.0),
    # ulmfit's masked-LM stage did not pay on labelled sets of a few hundred texts: 0.797
    # against 0.871 for fine_tune on a 10-class task of 100 per class, and no gain for one
    # more epoch's wall time on bench/text_quality.py; `lm_epochs` brings it back.
    ("text", "ulmfit"): PresetDefaults(lm_epochs=0),
}


def preset_defaults(modality: str, strategy: str) -> PresetDefaults:
    return PRESET_DEFAULTS.get((modality, strategy), PresetDefaults())


def default_lr(modality: str, strategy: str) -> float:
    """The rate a spec without `lr` gets (and `lr: auto` is compiled at before the finder)."""
    own = preset_defaults(modality, strategy).lr
    return MODALITY_DEFAULTS[modality].lr if own is None else own


def applied_defaults(modality: str, strategy: str, spec: Any) -> dict[str, Any]:
    """The preset's own defaults that `spec` (a `TransferSettings`) leaves in force, as the
    plan records them: empty when the preset has none or the spec sets them all."""
    own = asdict(preset_defaults(modality, strategy))
    return {
        name: value
        for name, value in own.items()
        if value is not None and getattr(spec, name, None) is None
    }
