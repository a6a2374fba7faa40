from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.bounds import ALIAS_PATTERN, BodySeed, RequestBody
from service.experiments.schemas import SharedSettings

UPDATE_EXAMPLE: dict[str, Any] = {
    "strategy": "lwf",
    "promote": "auto",
    "alias": "production",
    "margin": 0.02,
    "settings": {"epochs": 3},
}


class UpdateIn(RequestBody):
    model_config = ConfigDict(json_schema_extra={"examples": [UPDATE_EXAMPLE]})

    version: str | None = Field(
        default=None,
        pattern=rf"^(?:[0-9]{{1,19}}|{ALIAS_PATTERN})$",
        description="The version to update (number or alias). Default: the one `alias` points "
        "to, else the latest.",
    )
    strategy: Literal["lwf", "fine_tune"] = Field(
        default="lwf",
        description="`lwf` keeps the version's task beside the new one, distilled towards its "
        "own answers (Learning without Forgetting: the old data is not needed); `fine_tune` "
        "trains all of the version's weights on the feedback.",
    )
    dataset: str | None = Field(
        default=None,
        max_length=40,
        description="A ready dataset of yours whose items join the feedback's for training.",
    )
    holdout_fraction: float = Field(
        default=0.3,
        gt=0.0,
        lt=1.0,
        description="Share of the labelled feedback held out (per label) to score the candidate "
        "and the version; never trained on.",
    )
    seed: BodySeed = Field(default=0, description="Draws the held-out feedback.")
    promote: bool | Literal["auto"] = Field(
        default=False,
        description="`true`: point `alias` at the candidate once scored; `auto`: only when it is "
        "more accurate on the held-out feedback than the version and loses less than `margin` "
        "of the version's accuracy on its old task's validation items; `false`: never (promote "
        "later with `POST .../updates/{id}/promote`).",
    )
    alias: str = Field(default="production", pattern=f"^{ALIAS_PATTERN}$")
    margin: float = Field(
        default=0.02,
        ge=0.0,
        le=1.0,
        description="Largest loss of old-task accuracy `auto` accepts (0.02: two points).",
    )
    settings: SharedSettings = Field(
        default_factory=SharedSettings,
        description="Transfer settings of the training job (a job spec's fields, e.g. `epochs`).",
    )


class UpdateScores(BaseModel):
    feedback_items: int = Field(description="Held-out feedback items both were scored on.")
    feedback_accuracy: float = Field(description="The candidate's accuracy on them.")
    current_feedback_accuracy: float = Field(description="The updated version's.")
    old_task_items: int = Field(description="Validation items of the version's own task.")
    old_task_accuracy: float | None = Field(
        description="The candidate on the version's task (an `lwf` candidate with the head it "
        "kept; a `fine_tune` one with the version's head on its backbone); null when the "
        "version's dataset is gone."
    )
    current_old_task_accuracy: float | None


class UpdateOut(BaseModel):
    id: str
    model: str
    status: Literal["preparing", "training", "scoring", "ready", "failed"] = Field(
        description="`preparing` (the feedback's dataset is ingested), `training` (the job), "
        "`scoring`, then `ready` or `failed`."
    )
    from_version: int
    candidate_version: int | None
    strategy: str
    dataset_id: str | None
    job_id: str | None
    training_items: int = Field(description="Labelled feedback items trained on.")
    holdout_items: int
    promote: bool | Literal["auto"]
    alias: str
    margin: float
    scores: UpdateScores | None
    promoted: bool | None = Field(description="Whether `alias` now points at the candidate.")
    decision: str | None = Field(description="Why it was (or was not) promoted.")
    error_code: str | None
    error_message: str | None
    created_at: datetime
    updated_at: datetime
