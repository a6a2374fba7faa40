"""The one settings object for the API and the worker; every value comes from `THAW_*`."""

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="THAW_", extra="ignore")

    data_dir: Path = Field(
        default=Path("thaw-data"),
        description="Folder for the embedded database, artifacts and broker.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL; default: SQLite file `<data_dir>/thaw.db`.",
    )
    broker_url: str | None = Field(
        default=None,
        description="Celery broker URL; default: a filesystem broker under `<data_dir>/broker`.",
    )
    storage_dir: Path | None = Field(
        default=None, description="Artifact store folder; default `<data_dir>/artifacts`."
    )
    weights_dir: Path | None = Field(
        default=None,
        description="Pretrained weights folder (torchvision cache file names); "
        "default `<data_dir>/weights`.",
    )
    max_upload_bytes: int = Field(
        default=2 * 2**30, description="Largest accepted dataset upload, in bytes."
    )
    max_archive_members: int = Field(default=100_000, description="Most entries in an archive.")
    max_member_bytes: int = Field(default=50 * 2**20, description="Largest file in an archive.")
    max_extracted_bytes: int = Field(
        default=5 * 2**30, description="Most bytes extracted from one archive."
    )
    max_image_pixels: int = Field(default=40_000_000, description="Largest image, widthxheight.")
    max_predict_images: int = Field(default=64, description="Most images in one predict call.")
    max_predict_bytes: int = Field(
        default=20 * 2**20, description="Largest image accepted by predict, in bytes."
    )
    max_predict_texts: int = Field(default=256, description="Most texts in one predict call.")
    max_predict_text_chars: int = Field(
        default=20_000,
        description="Longest text predict reads, in characters; a longer one gets a per-item "
        "error.",
    )
    model_cache_size: int = Field(
        default=4, description="Model versions kept loaded for inference."
    )
    model_cache_bytes: int = Field(
        default=2 * 2**30,
        description="Memory budget of the inference model cache, in bytes (estimated from "
        "parameters and buffers); least recently used models are unloaded first.",
    )
    inference_backend: Literal["torch", "onnx"] = Field(
        default="onnx",
        description="`onnx` serves a version through ONNX Runtime when its `model.onnx` passed "
        "the parity check at publish (others run in PyTorch, the reason in `/metrics`); `torch` "
        "serves every version in PyTorch.",
    )
    inference_threads: int | None = Field(
        default=None,
        ge=1,
        description="CPU threads of one forward pass (ONNX Runtime intra-op, or torch); "
        "default: half the cores, at least 1, leaving the rest to decoding and HTTP.",
    )
    resolution_cache_seconds: float = Field(
        default=5.0,
        ge=0.0,
        description="How long predict reuses a resolved (model, version or alias) without a "
        "database read; changes made through this API process apply at once, others (CLI, "
        "other replicas) within this time. 0 turns the cache off.",
    )
    batch_max_size: int = Field(
        default=32,
        ge=1,
        description="Dynamic batching: most images in one forward pass; 1 turns batching off.",
    )
    batch_max_delay_ms: float = Field(
        default=5.0,
        ge=0.0,
        description="Dynamic batching: longest wait for more requests before a forward pass.",
    )
    batch_queue_size: int = Field(
        default=256,
        ge=1,
        description="Predict requests waiting per loaded model; beyond it predict answers 503.",
    )
    predict_max_in_flight: int = Field(
        default=256,
        ge=1,
        description="Predict calls one API process works on at once (reading, decoding, "
        "queued or in a forward pass); beyond it predict answers 503 with `Retry-After` at "
        "once, before any other work, so the calls it accepts finish in bounded time.",
    )
    onnx_export: bool = Field(
        default=True, description="Export `model.onnx` (checked against PyTorch) at publish."
    )
    torch_threads: int | None = Field(
        default=None, description="Torch CPU threads in the worker; default: all cores."
    )
    rate_limit_per_minute: int = Field(
        default=1200,
        ge=0,
        description="Requests per minute per API key, per API process; 0 turns it off.",
    )
    max_active_jobs_per_tenant: int = Field(
        default=16,
        ge=1,
        description="Queued plus running jobs a team may have; more are refused with 429.",
    )
    log_level: str = Field(default="INFO", description="Log level of the thaw processes.")
    reaper_interval_seconds: float = Field(
        default=15.0,
        gt=0,
        description="How often the API re-queues jobs whose worker vanished, fails jobs past "
        "their deadline and re-sends queued work a restarted or flushed broker lost.",
    )
    lease_seconds: float = Field(
        default=120.0,
        gt=0,
        description="A running job's lease, renewed every second by its worker; once it "
        "expires the job is handed to another worker. Also how long a worker retries "
        "database writes before giving the job up.",
    )
    max_worker_losses: int = Field(
        default=3,
        ge=1,
        description="Times a job's worker may vanish (lease expired) before the job fails "
        "with `worker_lost` instead of being retried.",
    )
    job_max_runtime_seconds: int = Field(
        default=24 * 3600,
        ge=1,
        description="Default of the job spec's `max_runtime_seconds`: how long a job may take "
        "from its first start before it fails with `deadline_exceeded`.",
    )

    @property
    def resolved_inference_threads(self) -> int:
        return self.inference_threads or max(1, (os.cpu_count() or 1) // 2)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'thaw.db').resolve()}"

    @property
    def resolved_storage_dir(self) -> Path:
        return (self.storage_dir or self.data_dir / "artifacts").resolve()

    @property
    def resolved_weights_dir(self) -> Path:
        return (self.weights_dir or self.data_dir / "weights").resolve()

    @property
    def broker_folder(self) -> Path:
        return (self.data_dir / "broker").resolve()

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"


@lru_cache
def get_settings() -> Settings:
    return Settings()
