"""The registry's tables. The database, not the broker, is the truth for job and dataset state."""

from datetime import datetime
from enum import StrEnum
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from service.db import Base, UTCDateTime, new_id, utcnow
from service.jobs.states import ExperimentStatus, JobKind, JobStatus, TrialState

S = TypeVar("S", bound=StrEnum)


class StateText(TypeDecorator[S]):
    """A state (of `states`, an enum of `service/jobs/states.py`) as its value in a
    VARCHAR(20), read back as the enum; writing anything that is not one of its states fails
    before it reaches the database."""

    impl = String(20)
    cache_ok = True

    def __init__(self, states: type[S]) -> None:
        super().__init__()
        self.states = states

    def process_bind_param(self, value: str | None, dialect: Any) -> str | None:
        return None if value is None else self.states(value).value

    def process_result_value(self, value: str | None, dialect: Any) -> S | None:
        return None if value is None else self.states(value)


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("tn"))
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    tenant: Mapped[Tenant] = relationship()


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ds"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), default="processing")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    error_code: Mapped[str | None] = mapped_column(String(50))
    error_message: Mapped[str | None] = mapped_column(Text)
    upload_bytes: Mapped[int] = mapped_column(Integer, default=0)
    val_fraction: Mapped[float] = mapped_column(Float, default=0.2)
    seed: Mapped[int] = mapped_column(Integer, default=0)
    classes: Mapped[list[str]] = mapped_column(JSON, default=list)
    class_counts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    num_labelled: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """Labelled items kept, whatever the modality."""
    # The first MAX_LISTED_SKIPPED skipped files or rows; `num_skipped` counts them all.
    skipped: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    num_skipped: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # "image" or "text"; None while an uploaded archive has not been read yet.
    modality: Mapped[str | None] = mapped_column(String(10))
    # CSV and JSON Lines uploads: the fields that hold the text and the label.
    text_column: Mapped[str | None] = mapped_column(String(200))
    label_column: Mapped[str | None] = mapped_column(String(200))
    keep_unlabelled: Mapped[bool] = mapped_column(Boolean, default=True)
    num_unlabelled: Mapped[int] = mapped_column(Integer, default=0)
    token_lengths: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Ingest holds a lease as a running job does (`service/datasets/lease.py`): the attempt
    # that claimed it, its worker, until when; the reaper re-sends a dataset whose lease
    # expired, or fails it once its workers vanished THAW_MAX_WORKER_LOSSES times.
    attempt: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    worker_losses: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("tenant_id", "idempotency_key"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("job"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"), index=True)
    kind: Mapped[str] = mapped_column(
        String(20), default=JobKind.TRAIN, server_default=JobKind.TRAIN.value
    )
    model_name: Mapped[str] = mapped_column(String(100))
    base_model: Mapped[str] = mapped_column(String(100))
    strategy: Mapped[str] = mapped_column(String(50))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    plan: Mapped[dict[str, Any]] = mapped_column(JSON)
    queue: Mapped[str] = mapped_column(String(20))
    status: Mapped[JobStatus] = mapped_column(
        StateText(JobStatus), default=JobStatus.QUEUED, index=True
    )
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    error_code: Mapped[str | None] = mapped_column(String(50))
    error_message: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    worker_losses: Mapped[int] = mapped_column(Integer, default=0)
    max_runtime_seconds: Mapped[int] = mapped_column(Integer)
    deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    model_version_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class JobEvent(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(20))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class RegisteredModel(Base):
    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("mdl"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    # The last version number handed out. Numbers are never reused, even after a delete, so a
    # client holding "version 3" can never silently get a different model.
    version_counter: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    capture: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """Keep the inputs of predictions (bounded), so that feedback can train an update."""
    capture_least_confident: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """While capturing, the least confident this many inputs of each window are flagged
    `low_confidence` and outlive the other unlabelled ones (`service/monitoring/capture.py`)."""


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("mv"))
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    # Unique: a job publishes at most one version, however often its task is delivered.
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), unique=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"))
    base_model: Mapped[str] = mapped_column(String(100))
    strategy: Mapped[str] = mapped_column(String(50))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    plan: Mapped[dict[str, Any]] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    labels: Mapped[list[str]] = mapped_column(JSON)
    artifacts: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    artifact_prefix: Mapped[str] = mapped_column(String(200))
    # How each optional export went, e.g. {"onnx": {"exported": true, "max_abs_diff": 3e-7}}.
    exports: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    archived_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    model: Mapped[RegisteredModel] = relationship()


class ModelTag(Base):
    __tablename__ = "model_tags"

    model_id: Mapped[str] = mapped_column(
        ForeignKey("models.id", ondelete="CASCADE"), primary_key=True
    )
    tag: Mapped[str] = mapped_column(String(100), primary_key=True, index=True)


class VersionTag(Base):
    __tablename__ = "model_version_tags"

    version_id: Mapped[str] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE"), primary_key=True
    )
    tag: Mapped[str] = mapped_column(String(100), primary_key=True, index=True)


class VersionMetric(Base):
    """A version's scalar metrics as rows, so lists can filter and sort on them in SQL."""

    __tablename__ = "model_version_metrics"

    version_id: Mapped[str] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[float] = mapped_column(Float)


class ModelAlias(Base):
    __tablename__ = "model_aliases"
    __table_args__ = (UniqueConstraint("model_id", "alias"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    alias: Mapped[str] = mapped_column(String(100))
    version_id: Mapped[str] = mapped_column(ForeignKey("model_versions.id"))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class Experiment(Base):
    """Several trials (base model x strategy x seed, each an ordinary job) on one dataset, scored
    on a test split that no trial trains or selects on (its item keys in storage)."""

    __tablename__ = "experiments"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("exp"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"), index=True)
    model_name: Mapped[str] = mapped_column(String(100))
    status: Mapped[ExperimentStatus] = mapped_column(
        StateText(ExperimentStatus), default=ExperimentStatus.RUNNING, index=True
    )
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    max_parallel: Mapped[int] = mapped_column(Integer)
    deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    test_split_key: Mapped[str] = mapped_column(String(200))
    test_size: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ExperimentTrial(Base):
    """One trial. Before it has a job its `state` is `pending` (or `not_started`, with the
    reason); once started, its status is its job's."""

    __tablename__ = "experiment_trials"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("trl"))
    experiment_id: Mapped[str] = mapped_column(
        ForeignKey("experiments.id", ondelete="CASCADE"), index=True
    )
    position: Mapped[int] = mapped_column(Integer)
    base_model: Mapped[str] = mapped_column(String(300))
    strategy: Mapped[str] = mapped_column(String(50))
    seed: Mapped[int] = mapped_column(Integer)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[TrialState] = mapped_column(StateText(TrialState), default=TrialState.PENDING)
    reason: Mapped[str | None] = mapped_column(Text)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), unique=True)
    trainable_parameters: Mapped[int] = mapped_column(Integer)
    total_parameters: Mapped[int] = mapped_column(Integer)
    # Set once, by whichever pass first sees the job ended: its event is written exactly once.
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ExperimentEvent(Base):
    __tablename__ = "experiment_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    experiment_id: Mapped[str] = mapped_column(
        ForeignKey("experiments.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[str] = mapped_column(String(20))
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


__all__ = [
    "ApiKey",
    "Dataset",
    "Experiment",
    "ExperimentEvent",
    "ExperimentTrial",
    "Job",
    "JobEvent",
    "ModelAlias",
    "ModelTag",
    "ModelVersion",
    "RegisteredModel",
    "Tenant",
    "VersionMetric",
    "VersionTag",
]


class MonitorWindow(Base):
    """A closed window of a version's predict traffic and its shift test."""

    __tablename__ = "monitor_windows"
    # The sequence number is unique per version: two processes closing a window at once
    # cannot both write the same one.
    __table_args__ = (UniqueConstraint("version_id", "seq"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("mw"))
    version_id: Mapped[str] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE"), index=True
    )
    seq: Mapped[int] = mapped_column(Integer)
    start: Mapped[datetime] = mapped_column(UTCDateTime)
    end: Mapped[datetime] = mapped_column(UTCDateTime)
    count: Mapped[int] = mapped_column(Integer)
    sampled: Mapped[int] = mapped_column(Integer)
    """Predictions whose features were kept and tested."""
    score: Mapped[float | None] = mapped_column(Float)
    p_value: Mapped[float | None] = mapped_column(Float)
    shifted: Mapped[bool | None] = mapped_column(Boolean)
    estimated_accuracy: Mapped[float | None] = mapped_column(Float)
    # {"class_frequencies": {...}, "class_shift": {...}, "confidence_shift": {...}, ...}
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class MonitorPrediction(Base):
    """One prediction as monitoring keeps it: what was answered, its reduced features until
    its window is tested, the label fed back for it, and the key of its input only where its
    model captures inputs."""

    __tablename__ = "monitor_predictions"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    """The `prediction_id` predict answered."""
    version_id: Mapped[str] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    predicted: Mapped[str] = mapped_column(String(200))
    confidence: Mapped[float] = mapped_column(Float)
    features: Mapped[bytes | None] = mapped_column(LargeBinary)
    """float32 reduced features while the window is open (sampled); cleared when it closes."""
    window_id: Mapped[str | None] = mapped_column(
        ForeignKey("monitor_windows.id", ondelete="SET NULL"), index=True
    )
    label: Mapped[str | None] = mapped_column(String(200))
    """The true label fed back, if any."""
    labelled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    input_key: Mapped[str | None] = mapped_column(String(200))
    """Where the input is kept, when its model captures inputs (`service/monitoring/capture.py`)."""
    input_bytes: Mapped[int | None] = mapped_column(Integer)
    low_confidence: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """Its input is kept as one of its window's least confident (the items most worth
    labelling)."""


class ModelUpdate(Base):
    """An update of a model from the labels fed back: dataset, training job, scores."""

    __tablename__ = "model_updates"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("upd"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    from_version_id: Mapped[str] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE")
    )
    """The version updated: the candidate starts from it and is compared with it."""
    status: Mapped[str] = mapped_column(String(20))
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"), index=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    holdout: Mapped[list[str]] = mapped_column(JSON)
    """Prediction ids whose labels score the candidate and never train it."""
    scores: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    promoted: Mapped[bool | None] = mapped_column(Boolean)
    error_code: Mapped[str | None] = mapped_column(String(50))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    scoring_sent: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """Times the reaper sent the scoring again because its worker had vanished."""


class Webhook(Base):
    """A tenant's webhook: where its events are sent, and the secret that signs them."""

    __tablename__ = "webhooks"

    tenant_id: Mapped[str] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    url: Mapped[str] = mapped_column(String(2000))
    secret: Mapped[str] = mapped_column(String(100))
    """Kept as is, since signing needs it (HMAC); shown to the tenant once, when set."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class WebhookDelivery(Base):
    """The outbox: an event written in the transaction that caused it, sent after commit by
    the API processes' senders, retried with backoff until delivered or out of attempts."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("evt"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    event: Mapped[str] = mapped_column(String(40))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(20), default="pending", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    """When it is due; while a sender holds it, when that sender's claim runs out."""
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
