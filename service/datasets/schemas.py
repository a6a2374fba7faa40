from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class SkippedFileOut(BaseModel):
    path: str
    code: str
    reason: str


class ClassCount(BaseModel):
    train: int
    val: int
    total: int


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
    num_images: int
    skipped: list[SkippedFileOut]
    created_at: datetime
    updated_at: datetime
