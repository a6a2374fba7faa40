from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, model_validator

LABEL_LENGTH = 200


class ShiftOut(BaseModel):
    score: float
    p_value: float


class WindowOut(BaseModel):
    seq: int = Field(description="The window's number, from 1, per version.")
    start: datetime = Field(description="When its first prediction was made.")
    end: datetime = Field(description="When its last prediction was made.")
    count: int = Field(description="Predictions in the window.")
    sampled: int = Field(description="Of them, those whose features were tested.")
    score: float | None = Field(
        description="Squared MMD of the window's reduced features against the reference; null "
        "without a reference."
    )
    p_value: float | None = Field(description="Its permutation p-value.")
    shifted: bool | None = Field(description="p_value below `significance`.")
    estimated_accuracy: float | None = Field(
        description="The mean calibrated top probability: the accuracy expected without labels."
    )
    observed_accuracy: float | None = Field(
        description="Accuracy on the window's predictions that were fed a label; null if none."
    )
    labelled: int = Field(description="Predictions of the window that were fed a label.")
    class_frequencies: dict[str, float] = Field(description="Share of each predicted label.")
    mean_confidence: float
    class_shift: ShiftOut | None = Field(
        default=None,
        description="Total variation distance of predicted-label frequencies from the "
        "reference's, with a chi-square p-value.",
    )
    confidence_shift: ShiftOut | None = Field(
        default=None, description="Kolmogorov-Smirnov statistic and p-value of confidences."
    )


class MonitoringOut(BaseModel):
    model: str
    version: int
    reference: bool = Field(description="Whether the version has a reference profile.")
    reason: str | None = Field(description="Why it has none.")
    significance: float
    window_size: int
    validation_accuracy: float | None = Field(
        description="Accuracy on the reference's validation sample."
    )
    validation_expected_accuracy: float | None = Field(
        description="The estimate on the same sample (how well calibrated the version is)."
    )
    windows: list[WindowOut] = Field(description="Oldest first.")


class FeedbackItem(BaseModel):
    prediction_id: str = Field(max_length=40, description="As predict answered it.")
    label: str = Field(min_length=1, max_length=LABEL_LENGTH, description="The true label.")


class FeedbackIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"prediction_id": "pr_0006440c2f3e1a9b2c3d4e5f6a7b", "label": "digit_3"},
                {
                    "feedback": [
                        {"prediction_id": "pr_0006440c2f3e1a9b2c3d4e5f6a7b", "label": "cat"}
                    ]
                },
            ]
        },
    )
    prediction_id: str | None = Field(default=None, max_length=40)
    label: str | None = Field(default=None, min_length=1, max_length=LABEL_LENGTH)
    feedback: list[FeedbackItem] | None = Field(
        default=None, min_length=1, max_length=1000, description="Many labels at once."
    )

    @model_validator(mode="after")
    def one_form(self) -> "FeedbackIn":
        single = self.prediction_id is not None or self.label is not None
        if single == (self.feedback is not None):
            raise ValueError('send {"prediction_id", "label"} or {"feedback": [...]}, not both')
        if single and (self.prediction_id is None or self.label is None):
            raise ValueError("send both prediction_id and label")
        return self

    def items(self) -> list[tuple[str, str]]:
        if self.feedback is not None:
            return [(item.prediction_id, item.label) for item in self.feedback]
        assert self.prediction_id is not None
        assert self.label is not None
        return [(self.prediction_id, self.label)]


class FeedbackOut(BaseModel):
    recorded: int


class CapturedOut(BaseModel):
    prediction_id: str
    version: int
    created_at: datetime
    predicted: str = Field(description="The label predict answered.")
    confidence: float = Field(description="Its calibrated probability.")
    label: str | None = Field(description="The true label fed back, if any.")
    bytes: int
    low_confidence: bool = Field(
        description="Kept as one of its window's `capture_least_confident` least confident."
    )


class CapturesOut(BaseModel):
    model: str
    capture: bool = Field(description="Whether predictions' inputs are being kept now.")
    capture_least_confident: int = Field(
        description="How many of each window's least confident inputs are flagged."
    )
    items: int = Field(description="Inputs kept, of this model's predictions.")
    bytes: int
    labelled: int = Field(description="Of them, those whose prediction was fed a label.")
    low_confidence: int = Field(description="Of them, those flagged least confident.")
    max_items: int
    max_bytes: int
    inputs: list[CapturedOut] = Field(
        description="At most `limit` kept inputs: flagged least confident first, then by "
        "confidence, lowest first (the items most worth labelling)."
    )
