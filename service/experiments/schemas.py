from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.bounds import BodySeed, RequestBody
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


FROM_PARENT_EXAMPLE: dict[str, Any] = {
    "dataset": "ds_0623f1c2a4b5e1a2b3c4d5e7",
    "model": "digits-high",
    "base_models": ["model:digits-low:1"],
    "strategies": ["feature_extraction", "fine_tune", "lwf"],
    "settings": {"epochs": 3, "batch_size": 16, "lr": 0.01, "image_size": 64, "seed": 1},
}
"""From a registered model: the leaderboard adds the old-task columns."""


def _leave_out_per_trial_settings(schema: dict[str, Any]) -> None:
    for name in PER_TRIAL:
        schema.get("properties", {}).pop(name, None)


class SharedSettingsFields(RequestBody):
    model_config = ConfigDict(json_schema_extra=_leave_out_per_trial_settings)

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
        doc="The transfer settings every trial shares: a job spec's settings (README, "
        "Strategies) without `base_model`, `strategy` and `stages`, which each trial sets.",
        base=SharedSettingsFields,
    )


class Budget(RequestBody):
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


class ExperimentIn(RequestBody):
    """What to compare: every base model with every strategy (and seed) on one dataset."""

    model_config = ConfigDict(json_schema_extra={"examples": [EXPERIMENT_EXAMPLE]})

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
    seeds: list[BodySeed] | None = Field(
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
    test_seed: BodySeed = Field(default=0, description="Seed of the test split's draw.")
    preselect: int | None = Field(
        default=None,
        ge=1,
        le=10,
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


_ROW_EXAMPLE: dict[str, Any] = {
    "rank": 1,
    "trial_id": "trl_0623f1c2a4b5e1a2b3c4d5e8",
    "base_model": "efficientnet_lite0",
    "strategy": "fine_tune",
    "seed": 7,
    "status": "succeeded",
    "job_id": "job_0623f1c2a4b5e1a2b3c4d5e8",
    "val_accuracy": 0.975,
    "val_loss": 0.094,
    "test_accuracy": 0.972,
    "test_accuracy_interval": [0.944, 0.994],
    "test_loss": 0.101,
    "test_macro_f1": 0.972,
    "epochs_run": 4,
    "epochs_to_best": 4,
    "wall_seconds": 41.3,
    "trainable_parameters": 3384450,
    "total_parameters": 3384450,
    "artifact_bytes": 13562944,
    "latency_ms_per_item": 7.9,
    "old_task_accuracy": None,
    "old_task_change": None,
    "model": "digits-experiment",
    "version": 4,
    "version_id": "mv_0623f1c2a4b5e1a2b3c4d5e8",
    "error": None,
}
_SCRATCH_ROW_EXAMPLE: dict[str, Any] = {
    **_ROW_EXAMPLE,
    "rank": 2,
    "trial_id": "trl_0623f1c2a4b5e1a2b3c4d5e9",
    "strategy": "scratch",
    "job_id": "job_0623f1c2a4b5e1a2b3c4d5e9",
    "val_accuracy": 0.65,
    "val_loss": 1.02,
    "test_accuracy": 0.639,
    "test_accuracy_interval": [0.569, 0.708],
    "test_loss": 1.05,
    "test_macro_f1": 0.627,
    "wall_seconds": 39.8,
    "version": 1,
    "version_id": "mv_0623f1c2a4b5e1a2b3c4d5e9",
}
EXPERIMENT_OUT_EXAMPLE: dict[str, Any] = {
    "id": "exp_0623f1c2a4b5e1a2b3c4d5e6",
    "status": "succeeded",
    "dataset_id": "ds_0623f1c2a4b5e1a2b3c4d5e6",
    "model_name": "digits-experiment",
    "request": {**EXPERIMENT_EXAMPLE, "strategies": ["scratch", "fine_tune"]},
    "test_size": 144,
    "max_parallel": 2,
    "deadline_at": "2026-05-01T13:00:00Z",
    "trials": [
        {
            "id": row["trial_id"],
            "position": position,
            "base_model": row["base_model"],
            "strategy": row["strategy"],
            "seed": row["seed"],
            "status": row["status"],
            "reason": None,
            "job_id": row["job_id"],
        }
        for position, row in enumerate([_SCRATCH_ROW_EXAMPLE, _ROW_EXAMPLE])
    ],
    "leaderboard": [_ROW_EXAMPLE, _SCRATCH_ROW_EXAMPLE],
    "diagnosis": {
        "base_models": [
            {
                "base_model": "efficientnet_lite0",
                "scratch": {"trials": 1, "best_val_accuracy": 0.65, "test_accuracy": 0.639},
                "comparisons": [
                    {
                        "strategy": "fine_tune",
                        "trials": 1,
                        "start": {"transfer": 0.9, "scratch": 0.31, "difference": 0.59},
                        "slope": {
                            "threshold": 0.585,
                            "epochs_to_threshold": {"transfer": 1, "scratch": 3},
                            "area_under_val_curve": {
                                "epochs": 4,
                                "transfer": 0.944,
                                "scratch": 0.508,
                            },
                        },
                        "asymptote": {
                            "transfer": 0.972,
                            "scratch": 0.639,
                            "difference": 0.333,
                            "interval": [0.257, 0.41],
                            "test_items": 144,
                        },
                        "negative_transfer": False,
                        "helps": True,
                        "cost": {"wall_seconds": {"transfer": 41.3, "scratch": 39.8}},
                    }
                ],
                "overfitting": [
                    {
                        "trial_id": "trl_0623f1c2a4b5e1a2b3c4d5e8",
                        "strategy": "fine_tune",
                        "flag": False,
                        "best_val_loss_epoch": 4,
                        "best_val_loss": 0.094,
                        "last_val_loss": 0.094,
                        "val_loss_rise": 0.0,
                        "train_loss_at_best": 0.05,
                        "last_train_loss": 0.05,
                    }
                ],
            }
        ],
        "negative_transfer": [],
        "summary": [
            "efficientnet_lite0/fine_tune: start 90.0 % val accuracy after epoch 1 against "
            "scratch's 31.0 %.",
            "efficientnet_lite0/fine_tune: reached 90 % of scratch's best val accuracy (58.5 %) "
            "in 1 epoch (scratch: 3 epochs); area under the val curve 0.944 vs 0.508 over 4 "
            "epochs.",
            "efficientnet_lite0/fine_tune: beat scratch (test accuracy 97.2 % vs 63.9 % on 144 "
            "items, difference 33.3 points, 95 % interval 25.7 to 41.0).",
        ],
    },
    "preselection": None,
    "created_at": "2026-05-01T12:00:00Z",
    "finished_at": "2026-05-01T12:01:30Z",
}


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
    old_task_accuracy: float | None = Field(
        default=None,
        description="For a trial from a registered model (`model:<name>:<version>`): accuracy "
        "on the parent's newest task, over the parent dataset's validation items; `lwf` answers "
        "with the old head it kept, other strategies with the parent's head on their backbone. "
        "None for other trials.",
    )
    old_task_change: float | None = Field(
        default=None,
        description="`old_task_accuracy` minus the parent's own accuracy on the same items: "
        "about 0 where the old task was kept, negative where it was lost.",
    )
    model: str
    version: int | None
    version_id: str | None
    error: str | None


class ExperimentOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [EXPERIMENT_OUT_EXAMPLE]})

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
    model_config = ConfigDict(
        from_attributes=True,
        json_schema_extra={
            "examples": [
                {
                    key: EXPERIMENT_OUT_EXAMPLE[key]
                    for key in (
                        "id",
                        "status",
                        "dataset_id",
                        "model_name",
                        "test_size",
                        "created_at",
                        "finished_at",
                    )
                }
            ]
        },
    )

    id: str
    status: str
    dataset_id: str
    model_name: str
    test_size: int
    created_at: datetime
    finished_at: datetime | None


class ExperimentEventOut(BaseModel):
    model_config = ConfigDict(
        from_attributes=True,
        json_schema_extra={
            "examples": [
                {
                    "id": 7,
                    "kind": "trial",
                    "data": {
                        "trial_id": _ROW_EXAMPLE["trial_id"],
                        "status": "succeeded",
                        "job_id": _ROW_EXAMPLE["job_id"],
                        "version": 4,
                        "test_accuracy": 0.972,
                    },
                    "created_at": "2026-05-01T12:01:29Z",
                }
            ]
        },
    )

    id: int
    kind: str
    data: dict[str, Any]
    created_at: datetime


PROMOTE_EXAMPLE: dict[str, Any] = {"trial": "trl_0623f1c2a4b5e1a2b3c4d5e6", "alias": "production"}


class PromoteIn(RequestBody):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{}, PROMOTE_EXAMPLE]},
    )

    trial: str | None = Field(
        default=None, description="A trial id; default: the leaderboard's first."
    )
    alias: str = Field(default="production", pattern=NAME_PATTERN, max_length=100)


class PromoteOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "experiment_id": EXPERIMENT_OUT_EXAMPLE["id"],
                    "trial_id": _ROW_EXAMPLE["trial_id"],
                    "model": "digits-experiment",
                    "alias": "production",
                    "version": 4,
                    "test_accuracy": 0.972,
                }
            ]
        }
    )

    experiment_id: str
    trial_id: str
    model: str
    alias: str
    version: int
    test_accuracy: float | None


class TestSplitOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "experiment_id": EXPERIMENT_OUT_EXAMPLE["id"],
                    "items": ["cat/0017.jpg", "cat/0042.jpg", "dog/0003.jpg"],
                }
            ]
        }
    )

    experiment_id: str
    items: list[str] = Field(
        description="Ids of the held-out dataset items, sorted: manifest paths for images, "
        "`row:<ordinal>` (in the dataset's row order) for texts."
    )
