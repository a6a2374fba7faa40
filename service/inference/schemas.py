from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class LabelScore(BaseModel):
    label: str
    probability: float


class ImageError(BaseModel):
    code: str
    message: str


class ImagePrediction(BaseModel):
    image: str = Field(description="The file name as sent.")
    top: list[LabelScore] | None = None
    prediction_id: str | None = Field(
        default=None,
        description="Send the true label under this id to `.../feedback` (absent on an error "
        "entry, or when THAW_MONITOR is off).",
    )
    error: ImageError | None = None


class TextPrediction(BaseModel):
    text_index: int = Field(description="The text's position in `texts`, from 0.")
    top: list[LabelScore] | None = None
    truncated: bool | None = Field(
        default=None,
        description="Whether the text was longer than the model reads (its `max_length` "
        "tokens), so only part of it was classified.",
    )
    prediction_id: str | None = Field(
        default=None,
        description="Send the true label under this id to `.../feedback` (absent on an error "
        "entry, or when THAW_MONITOR is off).",
    )
    error: ImageError | None = None


class PredictOut(BaseModel):
    model: str
    version: int
    task: str
    predictions: list[ImagePrediction] | list[TextPrediction] = Field(
        description="One entry per image (or text), in the order sent."
    )


class ImageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="", max_length=255, description="Echoed back as `image`.")
    data: str = Field(description="The image file's bytes, base64-encoded.")


PREDICT_JSON_EXAMPLE: dict[str, Any] = {
    "images": [{"name": "a.png", "data": "iVBORw0KGgo..."}],
    "top_k": 3,
}


class PredictOptions(BaseModel):
    top_k: int = Field(default=5, ge=1, le=100)
    task: str | None = Field(
        default=None, description="Which of the model's tasks answers; default: its only one."
    )
    calibrated: bool = Field(
        default=True,
        description="Temperature-scaled probabilities, as fitted on validation at publish (see "
        "the version's `metrics.calibration`); false answers the raw softmax.",
    )


class PredictJson(PredictOptions):
    # Strict, unlike the multipart form's options, which arrive as text.
    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"examples": [PREDICT_JSON_EXAMPLE]}
    )

    images: list[ImageIn] = Field(min_length=1)


PREDICT_TEXT_EXAMPLE: dict[str, Any] = {
    "texts": ["the strap broke after a week", "fast delivery, works as described"],
    "top_k": 3,
}


class PredictTextJson(PredictOptions):
    """A text model's predict body."""

    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"examples": [PREDICT_TEXT_EXAMPLE]}
    )

    texts: list[str] = Field(min_length=1, description="Texts to classify, in order.")
