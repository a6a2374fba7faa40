from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict


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
    base_model: str
    strategy: str
    dataset_id: str
    job_id: str
    labels: list[str]
    metrics: dict[str, Any]
    spec: dict[str, Any]
    plan: dict[str, Any]
    artifacts: list[ArtifactOut]
    created_at: datetime


class VersionSummary(BaseModel):
    id: str
    version: int
    val_accuracy: float | None
    created_at: datetime


class ModelOut(BaseModel):
    id: str
    name: str
    created_at: datetime
    latest_version: VersionSummary | None
    aliases: dict[str, int]
