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
    redis_url: str | None = Field(
        default=None,
        description="Redis that API replicas share: the per-key rate limit and the change "
        "generations that clear every replica's caches at once; default: `THAW_BROKER_URL` "
        "when it is a `redis://` URL, else none (limits per process, generations in files "
        "under `<data_dir>/generations`).",
    )
    storage_dir: Path | None = Field(
        default=None, description="Artifact store folder; default `<data_dir>/artifacts`."
    )
    storage_url: str | None = Field(
        default=None,
        description="`s3://bucket/prefix`: keep artifacts in an S3-compatible object store "
        "(credentials and region from the standard `AWS_*` variables); default: the local "
        "folder `THAW_STORAGE_DIR`.",
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="Endpoint of a non-AWS S3-compatible store (MinIO, Ceph, R2), e.g. "
        "`http://minio:9000`; default: AWS.",
    )
    cache_dir: Path | None = Field(
        default=None,
        description="This host's cache of objects read from an object store (datasets, "
        "weights, model files), shared by its processes; default `<data_dir>/cache`.",
    )
    cache_bytes: int = Field(
        default=20 * 2**30,
        ge=0,
        description="Size budget of `THAW_CACHE_DIR`; least recently used entries not in use "
        "are removed beyond it.",
    )
    weights_dir: Path | None = Field(
        default=None,
        description="Pretrained weights folder (torchvision cache file names); "
        "default `<data_dir>/weights`.",
    )
    max_upload_bytes: int = Field(
        default=2 * 2**30, description="Largest accepted dataset upload, in bytes."
    )
    max_json_body_bytes: int = Field(
        default=2**20,
        ge=1024,
        description="Largest request body, in bytes, outside uploads and predict (which have "
        "their own caps): a larger one is refused with 413 as it arrives.",
    )
    max_archive_members: int = Field(default=100_000, description="Most entries in an archive.")
    max_member_bytes: int = Field(default=50 * 2**20, description="Largest file in an archive.")
    max_extracted_bytes: int = Field(
        default=5 * 2**30, description="Most bytes extracted from one archive."
    )
    max_image_pixels: int = Field(default=40_000_000, description="Largest image, widthxheight.")
    max_text_field_bytes: int = Field(
        default=100_000,
        description="Largest text or label in a text dataset upload (one CSV or JSON Lines "
        "field, or one .txt file), in UTF-8 bytes; longer rows are skipped and reported.",
    )
    max_predict_images: int = Field(default=64, description="Most images in one predict call.")
    max_predict_bytes: int = Field(
        default=20 * 2**20, description="Largest image accepted by predict, in bytes."
    )
    max_predict_pixels: int = Field(
        default=4_000_000,
        description="Most pixels predict decodes per image (width x height; a JPEG counts at "
        "the reduced scale it is decoded at, see the README): a larger image gets a "
        "`too_many_pixels` error entry. Decoding time grows with it.",
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
    api_processes: int | None = Field(
        default=None,
        ge=1,
        description="API processes `thaw serve` and `thaw api` run on this host, each with its "
        "own model cache, batchers and rate-limit buckets (one process's event loop holds the "
        "GIL for HTTP, so one process serves about one core's worth of calls); default: one "
        "per core.",
    )
    connection_max_age_seconds: float | None = Field(
        default=None,
        ge=0,
        description="Seconds a keep-alive connection serves calls before a response closes it "
        "(the client reconnects, and the kernel hands the new connection to whichever API "
        "process accepts first), so a few long-lived connections spread over the processes; 0 "
        "keeps connections open. Default: 1 when `THAW_API_PROCESSES` is above 1, else 0.",
    )
    inference_threads: int | None = Field(
        default=None,
        ge=1,
        description="CPU threads of one forward pass (ONNX Runtime intra-op, or torch); "
        "default: half the cores shared out among the API processes, at least 1, leaving the "
        "rest to decoding and HTTP.",
    )
    resolution_cache_seconds: float = Field(
        default=5.0,
        ge=0.0,
        description="How long predict reuses a resolved (model, version or alias) without a "
        "database read; a change committed by any process (this one, the CLI, another "
        "replica) clears it before the next request. 0 turns the cache off.",
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
    batch_queue_batches: int = Field(
        default=2,
        ge=1,
        description="Dynamic batching: how many full forward passes' worth of inputs "
        "(`THAW_BATCH_MAX_SIZE` each) may wait per loaded model, counted from the moment a call "
        "is accepted; beyond it predict answers 503 with `Retry-After`, so an accepted call "
        "waits for at most this many passes ahead of its own.",
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
    monitor: bool = Field(
        default=True,
        description="Record predict traffic per version (a prediction id, the predicted label, "
        "its confidence and, sampled, its reduced backbone features; never the input) and test "
        "each window of it for shift against the version's reference profile.",
    )
    monitor_sample_rate: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="Share of predictions whose reduced features are kept for the shift test.",
    )
    monitor_window_size: int = Field(
        default=500,
        ge=2,
        le=10_000,
        description="Predictions per monitoring window (pooled over every API process).",
    )
    monitor_window_minutes: float = Field(
        default=60.0,
        gt=0,
        description="A window also closes once its oldest prediction is this old (checked as "
        "predictions arrive), however few it holds.",
    )
    capture_max_items: int = Field(
        default=10_000,
        ge=1,
        le=10_000_000,
        description="Inputs kept per model that captures them (`PATCH /v1/models/NAME` with "
        '`{"capture": true}`); beyond it the oldest unlabelled inputs go first.',
    )
    capture_max_bytes: int = Field(
        default=1024**3,
        ge=1,
        description="Bytes of inputs kept per model that captures them; beyond it the oldest "
        "unlabelled inputs go first.",
    )
    webhook_max_attempts: int = Field(
        default=8,
        ge=1,
        le=100,
        description="Attempts to deliver one webhook event (`PUT /v1/webhook`) before it is "
        "given up as `failed`.",
    )
    webhook_backoff_seconds: float = Field(
        default=10.0,
        gt=0,
        description="Wait before a webhook event's second attempt; each later wait doubles "
        "(the defaults retry for about 20 minutes).",
    )
    webhook_allow_private: bool = Field(
        default=False,
        description="Allow webhook URLs whose host resolves to a loopback, private, link-local "
        "(cloud metadata) or otherwise non-public address; off, such a URL is a 422 at "
        "`PUT /v1/webhook` and is checked again before each delivery.",
    )
    torch_threads: int | None = Field(
        default=None, description="Torch CPU threads in the worker; default: all cores."
    )
    rate_limit_per_minute: int = Field(
        default=1200,
        ge=0,
        description="Requests per minute per API key, shared by all API replicas through "
        "Redis when there is one (else per API process); 0 turns it off.",
    )
    api_key_cache_seconds: float = Field(
        default=60.0,
        ge=0.0,
        description="How long an API process reuses an authenticated key without a database "
        "read; a revoke (by any process) clears every replica's cache before its next "
        "request. 0 turns the cache off.",
    )
    metrics_token: str | None = Field(
        default=None,
        description="Bearer token a Prometheus scrape must send to `/metrics`; unset, "
        "`/metrics` answers anyone who can reach the API (fine on the embedded default's "
        "127.0.0.1; set it on a fleet).",
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
    queue_resend_seconds: float = Field(
        default=600.0,
        gt=0,
        description="A job queued this long (since it was queued or last re-sent) while a "
        "live worker consumes its queue has its task message sent again: the case of a "
        "message lost without the broker restarting.",
    )
    lease_seconds: float = Field(
        default=120.0,
        gt=0,
        description="A running job's lease, and a dataset ingest's, renewed every second by "
        "its worker; once it expires the job or dataset is handed to another worker. Also how "
        "long a worker retries database writes before giving the job up.",
    )
    max_worker_losses: int = Field(
        default=3,
        ge=1,
        description="Times a job's or a dataset ingest's worker may vanish (lease expired) "
        "before the job or dataset fails with `worker_lost` instead of being retried.",
    )
    job_max_runtime_seconds: int = Field(
        default=24 * 3600,
        ge=1,
        description="Default of the job spec's `max_runtime_seconds`: how long a job may take "
        "from its first start before it fails with `deadline_exceeded`.",
    )

    @property
    def resolved_api_processes(self) -> int:
        return self.api_processes or os.cpu_count() or 1

    @property
    def resolved_connection_max_age_seconds(self) -> float:
        if self.connection_max_age_seconds is not None:
            return self.connection_max_age_seconds
        return 1.0 if self.resolved_api_processes > 1 else 0.0

    @property
    def resolved_inference_threads(self) -> int:
        cores = os.cpu_count() or 1
        return self.inference_threads or max(1, cores // (2 * self.resolved_api_processes))

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'thaw.db').resolve()}"

    @property
    def resolved_storage_dir(self) -> Path:
        return (self.storage_dir or self.data_dir / "artifacts").resolve()

    @property
    def resolved_cache_dir(self) -> Path:
        return (self.cache_dir or self.data_dir / "cache").resolve()

    @property
    def resolved_weights_dir(self) -> Path:
        return (self.weights_dir or self.data_dir / "weights").resolve()

    @property
    def broker_folder(self) -> Path:
        return (self.data_dir / "broker").resolve()

    @property
    def shared_redis_url(self) -> str | None:
        if self.redis_url is not None:
            return self.redis_url
        broker = self.broker_url or ""
        return broker if broker.startswith(("redis://", "rediss://")) else None

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"


@lru_cache
def get_settings() -> Settings:
    return Settings()
