"""Defaults that follow the data: what an unset `augment`, `label_smoothing`, `tta` and `refit`
become.

Measured on real images (bench/quality.py): at 5 images per class, augmentation and label
smoothing cost accuracy (a head on few images needs every clean view it has); at 100 per class,
a careful script's light augmentation with label smoothing 0.1 beat training without them.
So an image plan whose spec leaves them out gets them from the training split's size per class:
`light` and 0.1 from `DATA_RICH_PER_CLASS` images per class, `none` and 0 below (and when the
size is unknown). Text plans never augment.

Test-time augmentation follows the training augmentation: `flip` (the image and its mirror,
averaged) when the last stage trains on mirrored images, else `none`. A model trained to give a
mirrored image the same class loses nothing by being asked both ways, and the average has less
variance; one never shown mirrors (few shots, `flip: false`, a distilled stage) would be asked
about images unlike any it trained on. At 100 per class (bench/quality.py, the README's table)
the two views scored above the one on both image sets and every seed measured, digits
included (their model, too, trained on mirrored digits).

A small training split refits (`refit`, from `REFIT_MAX_TRAIN_ITEMS` items down): the labels
held out for validation are worth most where there are few, and one more run of a small set
is cheap; a script that trains on every label otherwise starts a fifth of the data ahead.

The choices and their reasons go in the plan's `extra["defaults"]`, which the preview shows.
Standard library only, like `spec`.
"""

from typing import Any

from .modalities import modality_for
from .recipe import augment_level
from .spec import DATA_RICH_PER_CLASS, REFIT_MAX_TRAIN_ITEMS, TransferSettings

RICH_AUGMENT = "light"
RICH_LABEL_SMOOTHING = 0.1


def data_defaults(
    settings: TransferSettings,
    *,
    modality: str,
    num_classes: int,
    train_size: int | None,
    last_stage_distills: bool,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The resolved `augment`, `label_smoothing`, `tta` and `refit`, and (when any was left out)
    what was chosen and why, for the plan's notes. `last_stage_distills`: the plan's last stage
    distils a parent's outputs, and so trains on unaugmented images (`augment_level`)."""
    resolved: dict[str, Any] = {
        "augment": settings.augment,
        "label_smoothing": settings.label_smoothing,
        "tta": settings.tta,
        "refit": settings.refit,
    }
    notes: dict[str, Any] = {}
    if settings.augment is None or settings.label_smoothing is None:
        chosen, why = _regularisation(modality, num_classes, train_size)
        for name in ("augment", "label_smoothing"):
            if resolved[name] is None:
                resolved[name] = notes[name] = chosen[name]
        notes["why"] = why
    if settings.tta is None:
        last_augment = augment_level(
            resolved["augment"], modality=modality, distill=last_stage_distills
        )
        resolved["tta"], why = _tta(last_augment, modality=modality, flip=settings.flip)
        notes["tta"], notes["tta_why"] = resolved["tta"], why
    if settings.refit is None:
        resolved["refit"], notes["refit_why"] = _refit(train_size)
        notes["refit"] = resolved["refit"]
    return resolved, notes or None


def _regularisation(
    modality: str, num_classes: int, train_size: int | None
) -> tuple[dict[str, Any], str]:
    none = {"augment": "none", "label_smoothing": 0.0}
    if not modality_for(modality).augments:
        return none, f"{modality} models do not augment"
    if train_size is None:
        return none, "the training split's size is unknown: the few-shot defaults"
    per_class = train_size / num_classes
    if per_class < DATA_RICH_PER_CLASS:
        return none, (
            f"{per_class:.0f} training images per class is under {DATA_RICH_PER_CLASS}: "
            "too few for augmentation or label smoothing to help"
        )
    rich = {"augment": RICH_AUGMENT, "label_smoothing": RICH_LABEL_SMOOTHING}
    return rich, (
        f"{per_class:.0f} training images per class is at least {DATA_RICH_PER_CLASS}: "
        "enough images that light augmentation and label smoothing help"
    )


def _tta(last_augment: str, *, modality: str, flip: bool) -> tuple[str, str]:
    if not modality_for(modality).augments:
        return "none", f"{modality} models do not augment: one view at prediction"
    if last_augment == "none":
        return "none", (
            "the last stage trains on unaugmented images: no mirrored view at prediction"
        )
    if not flip:
        return "none", "flip is false (mirroring changes the class): no mirrored view"
    return "flip", (
        f"the last stage trains on mirrored images (augment `{last_augment}`): predictions "
        "average the image and its mirror"
    )


def _refit(train_size: int | None) -> tuple[bool, str]:
    if train_size is None:
        return False, "the training split's size is unknown: no refit"
    if train_size <= REFIT_MAX_TRAIN_ITEMS:
        return True, (
            f"{train_size} training items is at most {REFIT_MAX_TRAIN_ITEMS}: once the run "
            "has chosen its recipe, it trains once more on training and validation items"
        )
    return False, (
        f"{train_size} training items is over {REFIT_MAX_TRAIN_ITEMS}: the validation items "
        "add little, and one more run would cost as much as this one"
    )
