"""Defaults that follow the data: what an unset `augment` and `label_smoothing` become.

Measured on real images (bench/quality.py): at 5 images per class, augmentation and label
smoothing cost accuracy (a head on few images needs every clean view it has); at 100 per class,
a careful script's light augmentation with label smoothing 0.1 beat training without them.
So an image plan whose spec leaves them out gets them from the training split's size per class:
`light` and 0.1 from `DATA_RICH_PER_CLASS` images per class, `none` and 0 below (and when the
size is unknown). Text plans never augment. The choice and its reason go in the plan's
`extra["defaults"]`, which the preview shows. Standard library only, like `spec`.
"""

from typing import Any

from .spec import DATA_RICH_PER_CLASS, TransferSettings

RICH_AUGMENT = "light"
RICH_LABEL_SMOOTHING = 0.1


def data_defaults(
    settings: TransferSettings, *, modality: str, num_classes: int, train_size: int | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The resolved `augment` and `label_smoothing`, and (when either was left out) what was
    chosen and why, for the plan's notes."""
    resolved: dict[str, Any] = {
        "augment": settings.augment,
        "label_smoothing": settings.label_smoothing,
    }
    unset = [name for name, value in resolved.items() if value is None]
    if not unset:
        return resolved, None
    if modality != "image":
        chosen: dict[str, Any] = {"augment": "none", "label_smoothing": 0.0}
        why = "text models do not augment"
    elif train_size is None:
        chosen = {"augment": "none", "label_smoothing": 0.0}
        why = "the training split's size is unknown: the few-shot defaults"
    else:
        per_class = train_size / num_classes
        rich = per_class >= DATA_RICH_PER_CLASS
        chosen = (
            {"augment": RICH_AUGMENT, "label_smoothing": RICH_LABEL_SMOOTHING}
            if rich
            else {"augment": "none", "label_smoothing": 0.0}
        )
        why = (
            f"{per_class:.0f} training images per class is "
            f"{'at least' if rich else 'under'} {DATA_RICH_PER_CLASS}: "
            + (
                "enough images that light augmentation and label smoothing help"
                if rich
                else "too few for augmentation or label smoothing to help"
            )
        )
    resolved = {name: chosen[name] if value is None else value for name, value in resolved.items()}
    return resolved, {**{name: resolved[name] for name in unset}, "why": why}
