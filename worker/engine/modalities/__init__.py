"""The modalities thaw trains on, as plug-ins: each is a `Modality` (see `base.py`) in its
own package, and this registry is the one place that lists them. Adding one is a package
here and a line in `MODALITIES`."""

from .base import Inputs, Modality
from .image import ImageModality
from .text import TextModality

MODALITIES: tuple[Modality, ...] = (ImageModality(), TextModality())

__all__ = [
    "MODALITIES",
    "Inputs",
    "Modality",
    "UnknownModalityError",
    "dataset_modality",
    "modality_for",
    "modality_of_base_model",
    "upload_modality",
]


class UnknownModalityError(ValueError):
    pass


def modality_for(name: str) -> Modality:
    """The modality a plan, dataset or model records as `name`."""
    for modality in MODALITIES:
        if modality.name == name:
            return modality
    known = ", ".join(modality.name for modality in MODALITIES)
    raise UnknownModalityError(f"unknown modality {name!r}; known: {known}")


def dataset_modality(name: str | None) -> Modality:
    """A dataset's modality, as shown; images while ingestion has not decided it (None)."""
    return modality_for(name or ImageModality.name)


def upload_modality(kind: str) -> Modality | None:
    """The modality of an upload of `kind` when only one modality takes that kind (a CSV:
    texts); None when ingestion must read the upload to tell (an archive)."""
    takers = [modality for modality in MODALITIES if kind in modality.upload_kinds]
    return takers[0] if len(takers) == 1 else None


def modality_of_base_model(name: str) -> Modality:
    """The modality whose zoo holds base model `name`."""
    for modality in MODALITIES:
        if modality.owns_base_model(name):
            return modality
    # The image zoo's error names every known model, of every modality.
    from .image.zoo import unknown_base_model

    raise unknown_base_model(name)
