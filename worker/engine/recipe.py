"""What a plan's training recipe is, per stage.

Standard library only, so the preview (`model.describe_plan`), the model card and the
dashboard, which read stored plans (`Plan.from_dict`) in the API process without torch, all
say the same:
each stage's resolved top rate, the augmentation its training batches get, the weight
average's decay, and the test-time views of the final validation.
"""

from typing import TYPE_CHECKING, Any

from .spec import HEAD_C_GRID, HEAD_CV_MAX_ITEMS

if TYPE_CHECKING:
    # Annotations only: this module is also shipped alone with exported models (it reads no
    # plan there), and `stages` imports it through `artifacts`.
    from .stages import Plan, Stage

ORIGINAL_VIEW = "original"
"""The one view of an image predicted without test-time augmentation."""
FLIP_VIEW = "flip"
CROP_VIEWS = (
    "crop_center",
    "crop_top_left",
    "crop_top_right",
    "crop_bottom_left",
    "crop_bottom_right",
)
TTA_MODES = {
    "none": (ORIGINAL_VIEW,),
    "flip": (ORIGINAL_VIEW, FLIP_VIEW),
    "flip_crops": (
        ORIGINAL_VIEW,
        FLIP_VIEW,
        *CROP_VIEWS,
        *(f"{FLIP_VIEW}_{c}" for c in CROP_VIEWS),
    ),
}
"""The views of each `tta` setting, in the order they are stacked (`pixels.view_pixels`)."""
AUTO_LR_PREVIEW = "auto, resolved at run time"
"""A stage's rate before the learning-rate finder has run (`lr: auto`)."""


def tta_views(mode: str, *, flip: bool) -> tuple[str, ...]:
    """The views of `tta: mode`; without `flip` (mirroring changes the class) no mirrored one."""
    return tuple(view for view in TTA_MODES[mode] if flip or FLIP_VIEW not in view)


def augment_level(augment: str, *, modality: str, distill: bool) -> str:
    """The augmentation a stage's training batches get: the plan's, except in stages that
    distil the parent's outputs (recorded on the unaugmented images), and never for text. A
    stage on cached features gets it through `feature_views` augmented views computed once
    (`features.py`)."""
    # Imported here: the modalities import the plan types, which import this module.
    from .modalities import modality_for

    if distill or not modality_for(modality).augments:
        return "none"
    return augment


def stage_augment(plan: "Plan", stage: "Stage") -> str:
    """The augmentation level a stage's training batches get (`augment_level`)."""
    return augment_level(plan.augment, modality=plan.modality, distill=stage.distill)


def cached_view_count(*, cache_features: bool, augment: str, feature_views: int) -> int | None:
    """How many views of each training item a stage on cached features trains on (1: the plain
    item; `feature_views` when the stage is augmented); None for a stage that trains the
    backbone, which sees fresh inputs every epoch."""
    if not cache_features:
        return None
    return feature_views if augment != "none" else 1


def stage_recipes(plan: "Plan") -> list[dict[str, Any]]:
    """Per stage of `plan`: `reads` (its input in its modality's words), `lr` (its top
    group's rate, or
    `AUTO_LR_PREVIEW` until the finder has run),
    `augment`, `feature_views` and `passes` (on cached features: the views of each item and
    the passes over them per epoch), `solver` (a solved head stage: how, and the L2
    strengths it chooses from; None for a stepped stage), `ema` (the decay, or None) and
    `tta` (the last stage of an image plan: the views the final validation and predict
    average; None elsewhere)."""
    # Imported here: the modalities import the plan types, which import this module.
    from .modalities import modality_for

    modality = modality_for(plan.modality)
    recipes = []
    for index, stage in enumerate(plan.stages):
        last = index == len(plan.stages) - 1
        augment = augment_level(plan.augment, modality=plan.modality, distill=stage.distill)
        recipes.append(
            {
                "reads": modality.stage_reads(plan, stage),
                "lr": AUTO_LR_PREVIEW if stage.auto_lr else max(stage.group_lrs.values()),
                "augment": augment,
                "feature_views": cached_view_count(
                    cache_features=stage.cache_features,
                    augment=augment,
                    feature_views=plan.feature_views,
                ),
                "passes": stage.passes,
                "solver": (
                    {
                        "method": "L-BFGS to the optimum (logistic regression)",
                        "c_grid": list(stage.c_grid or HEAD_C_GRID),
                        "chosen_on": "held-out accuracy, cross-validated over the "
                        "training and validation items (the validation split alone past "
                        f"{HEAD_CV_MAX_ITEMS} items or with a class of one item)",
                    }
                    if stage.solve
                    else None
                ),
                "ema": plan.ema,
                "tta": modality.tta(plan) if last else None,
            }
        )
    return recipes
