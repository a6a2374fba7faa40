from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from service.bounds import BodyId, RequestBody
from service.jobs.schemas import StoredPlan
from service.monitoring.capture import MAX_LEAST_CONFIDENT

Tag = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/=-]{0,99}$"),
]
TAG_DESCRIPTION = "Up to 32 tags of letters, digits and `._:/=-`, 100 characters each."


class ArtifactOut(BaseModel):
    name: str
    size: int
    sha256: str


class VersionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    model: str
    version: int
    aliases: list[str]
    tags: list[str]
    archived: bool
    archived_at: datetime | None
    base_model: str
    strategy: str
    dataset_id: str
    job_id: str
    labels: list[str]
    metrics: dict[str, Any] = Field(
        description="Final validation metrics: `val_accuracy`, `val_loss`, `per_class` "
        "(precision, recall, f1, support), `confusion_matrix` (rows: true class)."
    )
    spec: dict[str, Any]
    plan: StoredPlan
    exports: dict[str, Any] = Field(
        description="How optional exports went, e.g. `onnx`: `exported`, `max_abs_diff` "
        "(ONNX Runtime vs PyTorch), `reason` when it was not exported."
    )
    artifacts: list[ArtifactOut]
    created_at: datetime


class DatasetRef(BaseModel):
    id: str
    name: str | None = Field(description="Null when the dataset row is gone.")
    classes: list[str]
    num_labelled: int = Field(description="Labelled items kept (images, texts).")
    num_images: int = Field(description="An image dataset's `num_labelled` (0 for texts).")


class JobRef(BaseModel):
    id: str
    status: str | None
    created_at: datetime | None
    finished_at: datetime | None


class BaseModelRef(BaseModel):
    name: str = Field(description="The zoo architecture the weights descend from.")
    source: str = Field(
        description="`zoo`: a pretrained backbone from `/v1/base-models`; `registry`: one of "
        "your model versions (chained transfer), named in `model` and `version`."
    )
    model: str | None = None
    version: int | None = None
    version_id: str | None = None


class Lineage(BaseModel):
    base_model: BaseModelRef
    dataset: DatasetRef
    job: JobRef


class VersionDetail(VersionOut):
    history: list[dict[str, Any]] = Field(
        description="Per-epoch results from the job's epoch events, in order."
    )
    lineage: Lineage


class VersionSummary(BaseModel):
    id: str
    version: int
    val_accuracy: float | None
    created_at: datetime


class ModelOut(BaseModel):
    id: str
    name: str
    tags: list[str]
    capture: bool = Field(
        description="Whether the inputs of its predictions are kept (bounded), so that the "
        "labels fed back for them can train an update."
    )
    capture_least_confident: int = Field(
        description="While capturing, how many of each window's least confident inputs are "
        "flagged `low_confidence` and kept after the other unlabelled ones."
    )
    created_at: datetime
    latest_version: VersionSummary | None = Field(
        description="The highest-numbered version that is not archived."
    )
    aliases: dict[str, int]


class ModelPatch(RequestBody):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"tags": ["shoes"]},
                {"capture": True},
                {"capture": True, "capture_least_confident": 20},
            ]
        }
    )

    tags: list[Tag] | None = Field(default=None, max_length=32, description=TAG_DESCRIPTION)
    capture: bool | None = Field(
        default=None,
        description="Keep the inputs of this model's predictions from now on (true), or stop "
        "(false: what was kept stays until `DELETE /v1/models/NAME/captures`). Bounded by "
        "THAW_CAPTURE_MAX_ITEMS and THAW_CAPTURE_MAX_BYTES per model.",
    )
    capture_least_confident: int | None = Field(
        default=None,
        ge=0,
        le=MAX_LEAST_CONFIDENT,
        description="While capturing, flag the least confident this many inputs of each "
        "monitoring window (the items most worth labelling): they are listed by `GET "
        "/v1/models/NAME/captures` and, within the same bounds, go only after the other "
        "unlabelled inputs. 0 (the default) flags none.",
    )


class VersionPatch(RequestBody):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"tags": ["reviewed"], "archived": False}]}
    )

    tags: list[Tag] | None = Field(
        default=None, max_length=32, description=TAG_DESCRIPTION + " Replaces the version's tags."
    )
    archived: bool | None = Field(
        default=None,
        description="Archived versions leave default lists but stay addressable by number.",
    )


class AliasIn(RequestBody):
    model_config = ConfigDict(json_schema_extra={"examples": [{"version": 3}]})

    version: BodyId = Field(description="The version number the alias points at.")


class AliasOut(BaseModel):
    model: str
    alias: str
    version: int
