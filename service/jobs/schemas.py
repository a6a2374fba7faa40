from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field

from service.jobs.states import JobStatus
from worker.engine import BatchNormMode, Schedule, Strategy

SPEC_EXAMPLE: dict[str, Any] = {
    "dataset": "ds_0623f1c2a4b5e1a2b3c4d5e6",
    "model": "digits-classifier",
    "base_model": "efficientnet_lite0",
    "strategy": "freeze_unfreeze",
    "head": {"hidden": [256], "dropout": 0.2},
    "epochs": 6,
    "batch_size": 32,
    "lr": 0.001,
    "image_size": 224,
    "seed": 7,
}


class HeadSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hidden: list[Annotated[int, Field(ge=1, le=8192)]] = Field(
        default_factory=list,
        max_length=4,
        description="Sizes of hidden fully-connected layers before the classifier.",
    )
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


class StageIn(BaseModel):
    """One explicitly written stage; unset fields follow the spec."""

    model_config = ConfigDict(extra="forbid")

    groups: list[str] = Field(
        default_factory=lambda: ["all"],
        min_length=1,
        description="Layer group names (see the base model's groups), or `head`, `all`, "
        "or `top:<k>` (the top k backbone groups and the head).",
    )
    epochs: int = Field(default=1, ge=1, le=1000)
    lr: float | None = Field(
        default=None, gt=0.0, le=10.0, description="Rate of the top group; lower ones ÷ lr_decay."
    )
    lrs: dict[str, Annotated[float, Field(gt=0.0, le=10.0)]] | None = Field(
        default=None, description="A rate for every trainable group instead of `lr`."
    )
    lr_decay: float | None = Field(default=None, ge=1.0, le=100.0)
    schedule: Schedule | None = None
    bn_mode: BatchNormMode | None = None
    image_size: int | None = Field(default=None, ge=64, le=1024)
    name: str | None = Field(default=None, max_length=50)


class JobSpec(BaseModel):
    """What to train: the transfer spec of DESIGN §4."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [SPEC_EXAMPLE]})

    dataset: str = Field(description="A `ready` dataset id.")
    model: str = Field(
        pattern=r"^[a-z0-9][a-z0-9._-]{0,99}$",
        description="Registry name to publish under (a new version each run): lowercase "
        "letters, digits, `.`, `_`, `-`.",
    )
    base_model: str = Field(
        default="efficientnet_lite0",
        max_length=300,
        description="A name from the zoo (GET /v1/base-models), or `model:<name>:<version or "
        "alias>` to start from one of your registered models (chained transfer; required "
        "by `lwf`).",
    )
    strategy: Strategy = Field(
        default="freeze_unfreeze", description="A preset; see the README's table."
    )
    head: HeadSpec = Field(default_factory=HeadSpec)
    epochs: int = Field(default=6, ge=1, le=1000)
    batch_size: int = Field(default=32, ge=1, le=4096)
    lr: float = Field(default=1e-3, gt=0.0, le=10.0)
    image_size: int | None = Field(
        default=None, ge=64, le=1024, description="Default: the base model's input size."
    )
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(default=0.01, ge=0.0, le=1.0)
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)
    schedule: Schedule = "cosine"
    lr_decay: float = Field(
        default=2.6, ge=1.0, le=100.0, description="Discriminative rate: each lower group ÷ this."
    )
    fine_tune_lr_factor: float = Field(
        default=0.1,
        gt=0.0,
        le=1.0,
        description="Once the backbone trains, the head's rate is lr * this (then ÷ lr_decay "
        "per lower group).",
    )
    bn_mode: BatchNormMode = Field(
        default="frozen",
        description="BatchNorm in stages that train the backbone: `frozen` keeps the "
        "pretrained running statistics (best for small datasets), `train` updates them.",
    )
    head_epochs: int | None = Field(
        default=None, ge=1, le=1000, description="freeze_unfreeze: epochs of the head-only stage."
    )
    partial_groups: int = Field(
        default=2, ge=1, le=100, description="partial: how many top backbone groups train."
    )
    stages: list[StageIn] | None = Field(
        default=None,
        max_length=50,
        description="Explicit stages instead of the preset's (then `epochs` is their sum).",
    )
    progressive_resizing: list[Annotated[int, Field(ge=64, le=1024)]] | None = Field(
        default=None,
        max_length=8,
        description="Increasing image sizes a stage's epochs move through, ending at the final "
        "size, e.g. [96, 128, 160].",
    )
    task_name: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9][a-z0-9._-]{0,99}$",
        description="Name of the task this model learns (default: the model's name); an `lwf` "
        "model answers it beside its parent's tasks.",
    )
    lwf_temperature: float = Field(default=2.0, gt=0.0, le=100.0)
    lwf_lambda: float = Field(
        default=1.0, ge=0.0, le=100.0, description="lwf: weight of the distillation loss."
    )
    amp: bool = Field(
        default=True, description="On CUDA: bf16 autocast (fp16 with loss scaling on older GPUs)."
    )
    early_stopping_patience: int | None = Field(default=None, ge=1, le=1000)
    pretrained: bool = Field(default=True, description="Start from the zoo's pretrained weights.")
    max_runtime_seconds: int | None = Field(
        default=None,
        ge=1,
        le=30 * 24 * 3600,
        description="Deadline: the job fails with `deadline_exceeded` this long after it first "
        "started, including time spent re-queued. Default: the server's "
        "THAW_JOB_MAX_RUNTIME_SECONDS.",
    )
    device: Literal["cpu", "cuda"] = Field(
        default="cpu", description="`cuda` sends the job to the `gpu` queue."
    )


class StagePreview(BaseModel):
    name: str
    epochs: int
    image_size: int
    schedule: str
    bn_mode: str
    cache_features: bool
    trainable_groups: list[dict[str, Any]]
    trainable_parameters: int
    total_parameters: int
    steps: int


class PlanOut(BaseModel):
    base_model: str
    num_classes: int
    stages: list[StagePreview]
    plan: dict[str, Any] = Field(description="The resolved plan the worker will run.")


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    status: JobStatus
    progress: float
    dataset_id: str
    model_name: str
    base_model: str
    strategy: str
    queue: str
    spec: dict[str, Any]
    plan: dict[str, Any]
    attempt: int = Field(description="How many times a worker has started this job.")
    deadline_at: datetime | None = Field(
        description="When the job fails with `deadline_exceeded` if it has not ended; set when "
        "it first starts."
    )
    error_code: str | None
    error_message: str | None
    model_version_id: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @computed_field(  # type: ignore[prop-decorator]
        description="Seconds left, estimated from the time this attempt has run and its "
        "`progress`; null when unknown (queued, not started, or no progress yet)."
    )
    @property
    def eta_seconds(self) -> float | None:
        return estimate_eta(status=self.status, progress=self.progress, started_at=self.started_at)


def estimate_eta(
    *, status: str, progress: float, started_at: datetime | None, now: datetime | None = None
) -> float | None:
    if status == "succeeded":
        return 0.0
    # Before the first progress report (e.g. while features are cached) there is no rate yet.
    if status != "running" or started_at is None or not 0.0 < progress < 1.0:
        return None
    elapsed = ((now or datetime.now(UTC)) - started_at).total_seconds()
    return round(max(elapsed, 0.0) * (1.0 - progress) / progress, 1)


class JobEventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    kind: str
    attempt: int
    data: dict[str, Any]
    created_at: datetime


STREAM_EXAMPLE = (
    "retry: 2000\n\n"
    'id: 41\nevent: status\ndata: {"id":41,"kind":"status","attempt":1,'
    '"data":{"status":"running"},"created_at":"2025-01-01T12:00:00Z"}\n\n'
    'event: progress\ndata: {"status":"running","progress":0.25,"eta_seconds":42.0}\n\n'
    'id: 42\nevent: epoch\ndata: {"id":42,"kind":"epoch","attempt":1,"data":{"stage":"head",'
    '"stage_index":0,"epoch":1,"global_epoch":1,"train_loss":1.2,"val_loss":0.9,'
    '"val_accuracy":0.71,"learning_rates":{"head":0.01},"seconds":3.1},'
    '"created_at":"2025-01-01T12:00:03Z"}\n\n'
    ": keep-alive\n\n"
    'id: 43\nevent: status\ndata: {"id":43,"kind":"status","attempt":1,'
    '"data":{"status":"succeeded","model":"digits","version":1},'
    '"created_at":"2025-01-01T12:00:09Z"}\n\n'
)


class JobMetricsOut(BaseModel):
    job_id: str
    epochs: list[dict[str, Any]] = Field(
        description="One entry per epoch in order: stage, stage_index, epoch, global_epoch, "
        "train_loss, val_loss, val_accuracy, learning_rates, seconds."
    )


class CheckpointOut(BaseModel):
    name: str
    size: int
    saved_at: datetime
