from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, computed_field

from service.bounds import BodySeed, RequestBody
from service.datasets.imbalance import imbalance_report
from service.datasets.ingest.results import MAX_LISTED_SKIPPED
from worker.engine.modalities import MODALITIES, dataset_modality
from worker.engine.spec import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE


def legacy_counts(modality: str | None, labelled: int) -> dict[str, int]:
    """A dataset's `num_labelled` under the names answers gave it first, per modality
    (`Modality.legacy_count_field`; 0 under the others'), kept for clients written then."""
    counts = {field: 0 for other in MODALITIES if (field := other.legacy_count_field) is not None}
    own = dataset_modality(modality).legacy_count_field
    if own is not None:
        counts[own] = labelled
    return counts


ModalityName = Annotated[
    str, WithJsonSchema({"enum": [modality.name for modality in MODALITIES], "type": "string"})
]
"""A name in the modality registry; the schema lists them."""


class SkippedFileOut(BaseModel):
    path: str | None = Field(
        description="The file as named in the archive (or the CSV manifest); null for a row of "
        "a CSV or JSON Lines upload, which `line` locates."
    )
    code: str
    reason: str
    line: int | None = Field(
        default=None, description="The line a skipped text row starts on (1 is the header)."
    )


class TokenLengthsOut(BaseModel):
    base_model: str = Field(examples=["minilm_l6"])
    max_length: int | None = Field(description="The model's maximum, special tokens included.")
    texts: int
    mean: float
    median: int
    p95: int
    max: int
    truncated: int = Field(description="Texts longer than `max_length`: they would be cut.")
    job_default_max_length: int | None = Field(
        description="The tokens per text a job uses when its spec sets no `max_length`."
    )
    truncated_at_job_default: int = Field(description="Texts longer than `job_default_max_length`.")


class ClassCount(BaseModel):
    train: int
    val: int
    total: int


class ClassSize(BaseModel):
    label: str
    train: int


class ImbalanceOut(BaseModel):
    imbalanced: bool = Field(
        description="`ratio` is above `threshold` (or a class has no training items)."
    )
    ratio: float | None = Field(
        description="Training items of the largest class over those of the smallest; null "
        "when the smallest has none."
    )
    threshold: float
    largest: ClassSize
    smallest: ClassSize
    suggestion: str | None = Field(description="What to train with, when imbalanced.")


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str = Field(examples=["ds_0623f1c2a4b5e1a2b3c4d5e6"])
    name: str
    status: Literal["processing", "ready", "failed"]
    progress: float = Field(description="Fraction of the archive processed, 0 to 1.")
    error_code: str | None
    error_message: str | None
    upload_bytes: int
    val_fraction: float
    seed: int
    classes: list[str]
    class_counts: dict[str, ClassCount]
    num_labelled: int = Field(description="Labelled items kept (images, texts).")
    modality: ModalityName | None = Field(
        description="null until an uploaded archive has been read."
    )
    num_unlabelled: int = Field(
        description="Texts kept without a label, for a language-model stage (`ulmfit`)."
    )
    text_column: str | None
    label_column: str | None
    token_lengths: TokenLengthsOut | None = Field(
        description="Token counts against a text model's maximum: `minilm_l6` at ingest when "
        "its tokenizer is installed, or the model asked for with `?base_model=`."
    )
    skipped: list[SkippedFileOut] = Field(
        description=f"The first {MAX_LISTED_SKIPPED} skipped files or rows, in the order met, "
        "each with its reason (and line); `num_skipped` counts them all."
    )
    num_skipped: int = Field(description="Every skipped file or row.")
    created_at: datetime
    updated_at: datetime

    @computed_field(  # type: ignore[prop-decorator]
        description="An image dataset's `num_labelled` (0 for texts): the name it had first."
    )
    @property
    def num_images(self) -> int:
        return legacy_counts(self.modality, self.num_labelled)["num_images"]

    @computed_field(  # type: ignore[prop-decorator]
        description="A text dataset's `num_labelled` (0 for images): the name it had first."
    )
    @property
    def num_texts(self) -> int:
        return legacy_counts(self.modality, self.num_labelled)["num_texts"]

    @computed_field(  # type: ignore[prop-decorator]
        description="The class balance of the training split, flagged when the largest class "
        "outnumbers the smallest more than `threshold` times; null until classes are known."
    )
    @property
    def imbalance(self) -> ImbalanceOut | None:
        report = imbalance_report(
            {label: counts.model_dump() for label, counts in self.class_counts.items()},
            self.modality,
        )
        return ImbalanceOut.model_validate(report) if report is not None else None


TRANSFERABILITY_EXAMPLE: dict[str, Any] = {"base_models": ["efficientnet_lite0"], "max_images": 500}


class TransferabilityIn(RequestBody):
    model_config = ConfigDict(json_schema_extra={"examples": [TRANSFERABILITY_EXAMPLE]})

    base_models: list[str] = Field(
        default_factory=lambda: ["efficientnet_lite0"],
        min_length=1,
        max_length=8,
        description="Zoo names (GET /v1/base-models) whose pretrained weights are installed.",
    )
    max_images: int = Field(
        default=500,
        ge=20,
        le=5000,
        description="Score on at most this many training images, drawn per class with `seed`.",
    )
    image_size: int | None = Field(
        default=None,
        ge=MIN_IMAGE_SIZE,
        le=MAX_IMAGE_SIZE,
        description="Default: each base model's input size.",
    )
    seed: BodySeed = 0


class GroupScoreOut(BaseModel):
    group: str
    logme: float


class BaseModelScoreOut(BaseModel):
    base_model: str
    logme: float = Field(
        description="LogME (You et al., 2021) of the pooled features: the per-sample log "
        "evidence of a linear model from features to labels. Higher transfers better; compare "
        "base models on the same dataset."
    )
    linear_probe_accuracy: float = Field(
        description="5-fold cross-validated accuracy of a linear classifier on the frozen "
        "features: about what `feature_extraction` can reach."
    )
    groups: list[GroupScoreOut] = Field(
        description="LogME of the features pooled after each layer group, input to output."
    )
    suggested_partial_groups: int = Field(
        description="For `partial`: train the groups after the one where LogME peaks."
    )
    seconds: float


class TransferabilityOut(BaseModel):
    dataset_id: str
    images: int = Field(description="Training images scored (the same for every base model).")
    ranking: list[BaseModelScoreOut] = Field(description="Best LogME first.")
