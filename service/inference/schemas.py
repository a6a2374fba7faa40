from pydantic import BaseModel, Field


class LabelScore(BaseModel):
    label: str
    probability: float


class ImageError(BaseModel):
    code: str
    message: str


class ImagePrediction(BaseModel):
    image: str = Field(description="The file name as sent.")
    top: list[LabelScore] | None = None
    error: ImageError | None = None


class PredictOut(BaseModel):
    model: str
    version: int
    predictions: list[ImagePrediction] = Field(
        description="One entry per image, in the order sent."
    )
