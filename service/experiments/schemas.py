from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.jobs.schemas import MODEL_NAME_HELP
from service.jobs.spec_schema import model_of
from worker.engine.spec import NAME_PATTERN, Strategy, TransferSettings

DEFAULT_STRATEGIES: list[Strategy] = [
    "scratch",
    "feature_extraction",
    "partial",
    "freeze_unfreeze",
    "gradual_unfreeze",
    "fine_tune",
]
PER_TRIAL = ("base_model", "strategy", "stages")
"""Transfer settings an experiment chooses per trial, so its shared settings leave them out."""
MAX_TRIALS = 100

EXPERIMENT_EXAMPLE: dict[str, Any] = {
    "dataset": "ds_0623f1c2a4b5e1a2b3c4d5e6",
    "model": "digits-experiment",
    "base_models": ["efficientnet_lite0"],
    "strategies": ["scratch", "feature_extraction", "freeze_unfreeze", "fine_tune"],
    "settings": {"epochs": 4, "batch_size": 32, "lr": 0.001, "image_size": 64, "seed": 7},
    "seeds": [7],
    "test_fraction": 0.2,
    "budget": {"max_parallel": 2, "deadline_seconds": 3600},
}


def _leave_out_per_trial_settings(schema: dict[str, Any]) -> None:
    for name in PER_TRIAL:
        schema.get("properties", {}).pop(name, None)


class SharedSettingsFields(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_leave_out_per_trial_settings)

    @model_validator(mode="before")
    @classmethod
    def _no_per_trial_settings(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in PER_TRIAL:
                if name in data:
                    raise ValueError(
                        f"{name} is chosen per trial: list base models in `base_models` and "
                        "strategies in `strategies`, not in `settings`"
                    )
        return data


if TYPE_CHECKING:
    SharedSettings = SharedSettingsFields
else:
    SharedSettings = model_of(
        TransferSettings,
        name="ExperimentSettings",
        doc="The transfer settings every trial shares: a job spec's settings (ARCHITECTURE.md "
        "§5) without `base_model`, `strategy` and `stages`, which each trial sets.",
        base=SharedSettingsFields,
    )


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_parallel: int = Field(
        default=2, ge=1, le=64, description="Most trials queued or running at once."
    )
    deadline_seconds: int | None = Field(
        default=None,
        ge=1,
        le=30 * 24 * 3600,
        description="Every trial must end this long after the experiment was created: a trial "
        "that has not started by then is `not_started`, one still running fails "
        "`deadline_exceeded`. Default: none beyond each job's own deadline.",
    )
    prune: bool = Field(
        default=False,
        description="Stop hopeless trials early by successive halving on val accuracy: at "
        "epochs 1, 2, 4, … a trial must be in the top half of the trials that reached that "
        "epoch (once three have), or its job is cancelled and it shows `pruned` with the "
        "numbers. `scratch` is never pruned.",
    )


class ExperimentIn(BaseModel):
    """What to compare: every base model with every strategy (and seed) on one dataset."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [EXPERIMENT_EXAMPLE]})

    dataset: str = Field(description="A `ready` dataset id.")
    model: str = Field(
        pattern=NAME_PATTERN,
        description=f"{MODEL_NAME_HELP} Every trial publishes a version under it, tagged "
        "`experiment:<id>` and `trial:<id>`.",
    )
    base_models: list[str] = Field(
        min_length=1, max_length=10, description="Candidate base models (GET /v1/base-models)."
    )
    strategies: list[Strategy] = Field(
        default_factory=lambda: list(DEFAULT_STRATEGIES),
        min_length=1,
        max_length=10,
        description="Strategies to try on each base model; include `scratch` for the diagnosis.",
    )
    settings: SharedSettings = Field(
        default_factory=SharedSettings,
        description="The transfer settings every trial shares (a job spec's fields).",
    )
    seeds: list[int] | None = Field(
        default=None,
        min_length=1,
        max_length=10,
        description="Repeat every trial once per seed. Default: `settings.seed` alone.",
    )
    test_fraction: float = Field(
        default=0.2,
        gt=0.0,
        le=0.5,
        description="Share of each class (in the dataset's train and val alike) held out as "
        "the test split, which no trial trains or selects on.",
    )
    test_seed: int = Field(default=0, ge=0, description="Seed of the test split's draw.")
    preselect: int | None = Field(
        default=None,
        ge=1,
        description="Keep only the best `preselect` base models by their transferability "
        "(LogME of frozen features, POST /v1/datasets/{id}/transferability) scored on the "
        "training rows outside the test split, before any trial runs; images only. The scores "
        "and the dropped models are in `preselection`.",
    )
    budget: Budget = Field(default_factory=Budget)

    @field_validator("base_models", "strategies", "seeds")
    @classmethod
    def _distinct(cls, values: list[Any] | None) -> list[Any] | None:
        if values is not None and len(set(values)) != len(values):
            raise ValueError("must not repeat an entry")
        return values

    @model_validator(mode="after")
    def _bounded(self) -> "ExperimentIn":
        count = len(self.base_models) * len(self.strategies) * len(self.seeds or [0])
        if count > MAX_TRIALS:
            raise ValueError(f"{count} trials; an experiment runs at most {MAX_TRIALS}")
        if self.preselect is not None and self.preselect > len(self.base_models):
            raise ValueError(
                f"preselect keeps {self.preselect} of {len(self.base_models)} base models; "
                "it must not exceed their count"
            )
        return self


class TrialOut(BaseModel):
    id: str
    position: int
    base_model: str
    strategy: str
    seed: int
    status: str = Field(
        description="`pending` until it has a job, then its job's status (`queued`, "
        "`running`, `succeeded`, ...); `not_started` (with `reason`) when it never got one; "
        "`pruned` (with `reason`) when successive halving stopped it."
    )
    reason: str | None
    job_id: str | None


class LeaderboardRow(BaseModel):
    rank: int
    trial_id: str
    base_model: str
    strategy: str
    seed: int
    status: str
    job_id: str | None
    val_accuracy: float | None
    val_loss: float | None
    test_accuracy: float | None
    test_accuracy_interval: list[float] | None = Field(
        description="Bootstrap 95 % interval of the test accuracy."
    )
    test_loss: float | None
    test_macro_f1: float | None
    epochs_run: int | None
    epochs_to_best: int | None = Field(description="The epoch with the best val accuracy.")
    wall_seconds: float | None = Field(description="From the job's start to its end.")
    trainable_parameters: int = Field(description="Most trainable in any of its stages.")
    total_parameters: int
    artifact_bytes: int | None = Field(description="Size of the published weights file.")
    latency_ms_per_item: float | None = Field(
        description="Median time of a one-item prediction with the exported model, measured "
        "by the worker on the test split."
    )
    model: str
    version: int | None
    version_id: str | None
    error: str | None


class ExperimentOut(BaseModel):
    id: str
    status: str = Field(
        description="`running` until every trial ended; then `succeeded` (at least one trial "
        "succeeded) or `failed`; `cancelled` when cancelled."
    )
    dataset_id: str
    model_name: str
    request: dict[str, Any]
    test_size: int = Field(description="Items in the held-out test split.")
    max_parallel: int
    deadline_at: datetime | None
    trials: list[TrialOut]
    leaderboard: list[LeaderboardRow] = Field(
        description="Ordered by test accuracy, ties broken by wall time then trainable "
        "parameters; trials without a test result last."
    )
    diagnosis: dict[str, Any] = Field(
        description="Per base model, each transfer strategy against scratch: start, slope, "
        "asymptote (paired bootstrap interval), negative_transfer, overfitting; and summary "
        "lines with their numbers."
    )
    preselection: dict[str, Any] | None = Field(
        description="With `preselect`: the images scored, each candidate's transferability "
        "(best LogME first), and the base models `kept` and `dropped`."
    )
    created_at: datetime
    finished_at: datetime | None


class ExperimentSummaryOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    status: str
    dataset_id: str
    model_name: str
    test_size: int
    created_at: datetime
    finished_at: datetime | None


class ExperimentEventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    kind: str
    data: dict[str, Any]
    created_at: datetime


PROMOTE_EXAMPLE: dict[str, Any] = {"trial": "trl_0623f1c2a4b5e1a2b3c4d5e6", "alias": "production"}


class PromoteIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{}, PROMOTE_EXAMPLE]},
    )

    trial: str | None = Field(
        default=None, description="A trial id; default: the leaderboard's first."
    )
    alias: str = Field(default="production", pattern=NAME_PATTERN, max_length=100)


class PromoteOut(BaseModel):
    experiment_id: str
    trial_id: str
    model: str
    alias: str
    version: int
    test_accuracy: float | None


class TestSplitOut(BaseModel):
    experiment_id: str
    items: list[str] = Field(
        description="Ids of the held-out dataset items, sorted: manifest paths for images, "
        "`row:<ordinal>` (in the dataset's row order) for texts."
    )
