from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, computed_field

from service.bounds import RequestBody
from service.jobs.spec_schema import model_of
from service.jobs.states import JobStatus
from worker.engine.spec import (
    FEW_SHOT_HEAD_STEPS,
    NAME_PATTERN,
    TransferSettings,
    decode,
    settings_of,
)
from worker.engine.stages import Plan

PLAN_DESCRIPTION = (
    "The resolved plan: the run settings, the stages, and `preprocessing`, its modality's "
    "(tagged `modality`: an image plan's `mean` and `std`, a text plan's `max_length` and "
    "`truncation`)."
)


def _current_plan(stored: Any) -> Any:
    """A stored plan as today's `Plan.to_dict` writes it: one written before `preprocessing`
    was one field shows it as one. One that has it shows as stored, unparsed (a page of 200
    jobs would otherwise parse 200 plans); so does anything that does not read as a plan."""
    if not isinstance(stored, dict) or not stored or "preprocessing" in stored:
        return stored
    try:
        return Plan.from_dict(stored).to_dict()
    except (KeyError, TypeError, ValueError):
        return stored


StoredPlan = Annotated[
    dict[str, Any], BeforeValidator(_current_plan), Field(description=PLAN_DESCRIPTION)
]
"""A job's or a version's plan as the API shows it."""

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


PARENT_PREFIX = "model:"
"""A base model that names a registered model version: `model:<name>:<version or alias>`."""

MODEL_NAME_HELP = (
    "Registry name to publish under (a new version each run): lowercase letters, digits, "
    "`.`, `_`, `-`."
)


class SpecFields(RequestBody):
    """A request's own fields; the transfer settings beside them come from the engine's
    declaration (`worker/engine/spec.py`)."""

    model_config = ConfigDict(json_schema_extra={"examples": [SPEC_EXAMPLE]})

    dataset: str = Field(description="A `ready` dataset id.")
    max_runtime_seconds: int | None = Field(
        default=None,
        ge=1,
        le=30 * 24 * 3600,
        description="Deadline: the job fails with `deadline_exceeded` this long after it first "
        "started, including time spent re-queued. Default: the server's "
        "THAW_JOB_MAX_RUNTIME_SECONDS.",
    )

    def transfer_settings(self) -> TransferSettings:
        """The transfer settings of this spec, typed as the engine declares them."""
        return decode(TransferSettings, self.model_dump(include=TRANSFER_SETTING_NAMES))


TRANSFER_SETTING_NAMES = {
    item.name for item, declared in settings_of(TransferSettings) if declared.public
}


class JobFields(SpecFields):
    model: str = Field(pattern=NAME_PATTERN, description=MODEL_NAME_HELP)


class PreviewFields(SpecFields):
    model: str | None = Field(
        default=None,
        pattern=NAME_PATTERN,
        description=f"Optional in a preview. {MODEL_NAME_HELP}",
    )


if TYPE_CHECKING:
    JobSpec = JobFields
    PreviewSpec = PreviewFields
else:
    JobSpec = model_of(
        TransferSettings,
        name="JobSpec",
        doc="What to train: the transfer spec (README, Strategies).",
        base=JobFields,
    )
    PreviewSpec = model_of(
        TransferSettings,
        name="PreviewSpec",
        doc="A transfer spec to preview: a job's spec, where `model` may be left out.",
        base=PreviewFields,
    )


def _absent(value: Any) -> bool:
    return value is None


class StagePreview(BaseModel):
    name: str
    epochs: int
    # A stage shows its own modality's inputs only (`Modality.stage_inputs`), not another's
    # as nulls.
    image_size: int | None = Field(
        default=None,
        exclude_if=_absent,
        description="Image base models: input size (absent for others).",
    )
    max_length: int | None = Field(
        default=None,
        exclude_if=_absent,
        description="Text base models: tokens per text (absent for others).",
    )
    objective: str | None = Field(
        default=None,
        exclude_if=_absent,
        description="Text base models: `classify`, or `masked_lm` (ulmfit's language-model "
        "stage); absent for others.",
    )
    reads: str = Field(
        default="",
        description="What the stage reads, in its modality's words (`64 px images`, `texts of "
        "up to 128 tokens (head)`).",
    )
    schedule: str
    bn_mode: str
    cache_features: bool
    trainable_groups: list[dict[str, Any]]
    trainable_parameters: int
    total_parameters: int
    passes: int = Field(
        default=1,
        description="Shuffled passes over the training items in each epoch: more than one on "
        "cached backbone features when the training split is small, so that the stage "
        f"takes at least {FEW_SHOT_HEAD_STEPS} optimizer steps in all.",
    )
    steps: int = Field(description="Optimizer steps of the stage, over all its epochs.")
    lr: float | str = Field(
        description="The stage's top rate, resolved (lower groups ÷ the decay); "
        "`auto, resolved at run time` for a spec with `lr: auto`: the learning-rate finder "
        "picks the rate before training (the groups' `lr` are null until then; they keep "
        "their ratios)."
    )
    augment: str = Field(description="The augmentation level of the stage's training batches.")
    feature_views: int | None = Field(
        default=None,
        description="Stages on cached backbone features: views of each training item whose "
        "features are computed once (1: plain; `feature_views` when augmented); null for "
        "stages that train the backbone.",
    )
    solver: dict[str, Any] | None = Field(
        default=None,
        description="A head stage solved rather than stepped (`solve_head`): the method, the "
        "L2 strengths (scikit-learn's C) it fits the optimum at, and what chooses among them; "
        "its `steps` count one per strength. Null for a stepped stage.",
    )
    ema: float | None = Field(description="The weight average's decay; null when off.")
    tta: list[str] | None = Field(
        description="Last stage of an image plan: the test-time views the final validation "
        "and predict average; null on other stages."
    )


class PlanOut(BaseModel):
    base_model: str
    num_classes: int
    stages: list[StagePreview]
    plan: dict[str, Any] = Field(description=f"{PLAN_DESCRIPTION} The worker runs it.")


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    kind: str = Field(
        description="`train` (publishes a model version) or `lr_find` (the learning-rate "
        "range test: GET /v1/jobs/{id}/lr-find)."
    )
    status: JobStatus
    progress: float
    dataset_id: str
    model_name: str
    base_model: str
    strategy: str
    queue: str
    spec: dict[str, Any]
    plan: StoredPlan
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


class LrFindOut(BaseModel):
    """A learning-rate range test (Smith 2015): the first stage trained for a short run at
    exponentially growing rates, the smoothed loss after each step, and fastai's "valley"
    suggestion (two thirds down the longest fall of the loss)."""

    job_id: str
    stage: str = Field(description="The stage tested: the plan's first classification stage.")
    lrs: list[float] = Field(description="The stage's top group's rate at each step.")
    losses: list[float] = Field(description="The smoothed training loss after each step.")
    suggestion: float = Field(description="The suggested rate for the stage's top group.")
    suggestion_index: int = Field(description="Where the suggestion lies in `lrs`.")
    lr: float | None = Field(
        description="The spec's `lr` (the head's rate on a frozen backbone) giving the tested "
        "stage the suggested rate; the other groups keep the plan's ratios."
    )
    diverged: bool = Field(description="The loss blew up before the last rate (the curve ends).")
    plot: str = Field(description="Where the SVG plot of the curve is.")


class CheckpointOut(BaseModel):
    name: str
    size: int
    saved_at: datetime
