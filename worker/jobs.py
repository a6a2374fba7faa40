"""Runs one training job: claim it in the database, train with the engine, publish the result."""

import dataclasses
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import update

from service.context import AppContext
from service.datasets.service import load_manifest
from service.db import new_id, utcnow
from service.jobs.history import epoch_history
from service.jobs.service import checkpoint_key, fail_job, job_files_prefix, record_event
from service.models.card import render_card
from service.models.service import StaleAttemptError, publish_version
from service.tables import Dataset, Job
from worker.engine import (
    EpochResult,
    Plan,
    Sample,
    TrainingCancelled,
    TrainingHooks,
    WeightsUnavailableError,
    export_model,
    run,
)
from worker.engine.onnx_export import ONNX_FILE, export_onnx

logger = logging.getLogger(__name__)

LEASE = timedelta(minutes=2)
LABELS_FILE = "labels.json"
CARD_FILE = "card.md"
STATUS_CHECK_SECONDS = 1.0


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def claim(context: AppContext, *, job_id: str, owner: str) -> int | None:
    """Move a queued job to running and return its attempt number; None if it is not ours to run."""
    now = utcnow()
    with context.db.session() as session:
        claimed = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "queued")
            .values(
                status="running",
                attempt=Job.attempt + 1,
                lease_owner=owner,
                lease_expires_at=now + LEASE,
                started_at=now,
            )
        )
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            session.rollback()
            return None
        job = session.get_one(Job, job_id)
        record_event(session, job=job, kind="status", data={"status": "running", "worker": owner})
        session.commit()
        return job.attempt


class JobHooks(TrainingHooks):
    """Writes an event per epoch and the job's progress; stops training when asked to."""

    def __init__(self, context: AppContext, *, job_id: str, attempt: int) -> None:
        self.context = context
        self.job_id = job_id
        self.attempt = attempt
        self.fraction_done = 0.0
        self._last_check = 0.0

    def on_epoch_end(self, result: EpochResult) -> None:
        with self.context.db.session() as session:
            job = session.get_one(Job, self.job_id)
            record_event(session, job=job, kind="epoch", data=dataclasses.asdict(result))
            session.commit()

    def on_progress(self, done_steps: int, total_steps: int) -> None:
        self.fraction_done = done_steps / max(total_steps, 1)

    def should_stop(self) -> bool:
        # Called between steps: one small write a second renews the lease, records progress and
        # learns whether a cancel arrived or another attempt took the job over.
        if time.monotonic() - self._last_check < STATUS_CHECK_SECONDS:
            return False
        self._last_check = time.monotonic()
        with self.context.db.session() as session:
            renewed = session.execute(
                update(Job)
                .where(Job.id == self.job_id, Job.attempt == self.attempt, Job.status == "running")
                .values(lease_expires_at=utcnow() + LEASE, progress=round(self.fraction_done, 4))
            )
            session.commit()
            return renewed.rowcount != 1  # type: ignore[attr-defined]


def execute(context: AppContext, *, job_id: str) -> None:
    attempt = claim(context, job_id=job_id, owner=worker_identity())
    if attempt is None:
        logger.info("job %s is not queued; this delivery does nothing", job_id)
        return
    with context.db.session() as session:
        job = session.get_one(Job, job_id)
        plan = Plan.from_dict(job.plan)
        dataset_id = job.dataset_id
    logger.info("job %s attempt %d: training %s", job_id, attempt, plan.base_model)
    try:
        _train_and_publish(
            context, job_id=job_id, attempt=attempt, plan=plan, dataset_id=dataset_id
        )
    except TrainingCancelled:
        _end_cancelled(context, job_id=job_id, attempt=attempt)
    except StaleAttemptError:
        logger.warning("job %s attempt %d lost the job; its result was discarded", job_id, attempt)
    except WeightsUnavailableError as exc:
        fail_job(context=context, job_id=job_id, code="weights_unavailable", message=str(exc))
    except Exception as exc:
        logger.exception("job %s failed", job_id)
        fail_job(context=context, job_id=job_id, **_failure_reason(exc))


def _train_and_publish(
    context: AppContext, *, job_id: str, attempt: int, plan: Plan, dataset_id: str
) -> None:
    manifest, root = load_manifest(context=context, dataset_id=dataset_id)
    train = [
        Sample(path=root / s.path, label=s.label) for s in manifest.samples if s.split == "train"
    ]
    val = [Sample(path=root / s.path, label=s.label) for s in manifest.samples if s.split == "val"]
    hooks = JobHooks(context, job_id=job_id, attempt=attempt)
    checkpoint = context.store.local_path(checkpoint_key(job_id))
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    resume_from = checkpoint if checkpoint.exists() else None
    if resume_from is not None:
        # An earlier attempt was lost (its lease expired): continue where it last saved.
        with context.db.session() as session:
            job = session.get_one(Job, job_id)
            record_event(session, job=job, kind="status", data={"status": "resumed"})
            session.commit()
    result = run(
        plan,
        train=train,
        val=val,
        classes=manifest.classes,
        hooks=hooks,
        weights_dir=context.settings.resolved_weights_dir,
        checkpoint_path=checkpoint,
        resume_from=resume_from,
    )
    if hooks.should_stop():
        raise TrainingCancelled()

    version_id = new_id("mv")
    prefix = f"models/{version_id}"
    export_dir = Path(tempfile.mkdtemp(dir=context.scratch_dir, prefix=f"export-{job_id}-"))
    exports: dict[str, Any] = {}
    try:
        out = export_dir / "artifacts"
        export_model(result, plan, out)
        (out / LABELS_FILE).write_text(json.dumps(manifest.classes, indent=2) + "\n")
        if context.settings.onnx_export:
            onnx = export_onnx(result.model, image_size=plan.image_size, out_path=out / ONNX_FILE)
            exports["onnx"] = onnx.to_dict()
        (out / CARD_FILE).write_text(
            _model_card(context, job_id=job_id, metrics=result.metrics, onnx=exports.get("onnx"))
        )
        names = sorted(path.name for path in out.iterdir())
        context.store.put_dir(prefix, out)
    finally:
        shutil.rmtree(export_dir, ignore_errors=True)
    artifacts = [
        {
            "name": name,
            "size": context.store.size(f"{prefix}/{name}"),
            "sha256": context.store.sha256(f"{prefix}/{name}"),
        }
        for name in names
    ]
    try:
        with context.db.session() as session:
            publish_version(
                session,
                job_id=job_id,
                attempt=attempt,
                version_id=version_id,
                metrics=result.metrics,
                labels=manifest.classes,
                artifacts=artifacts,
                artifact_prefix=prefix,
                exports=exports,
            )
    except BaseException:
        # Nothing may point at artifacts whose version was never committed.
        context.store.delete(prefix)
        raise
    context.store.delete(job_files_prefix(job_id))
    logger.info("job %s published %s", job_id, version_id)


def _model_card(
    context: AppContext, *, job_id: str, metrics: dict[str, Any], onnx: dict[str, Any] | None
) -> str:
    with context.db.session() as session:
        job = session.get_one(Job, job_id)
        dataset = session.get_one(Dataset, job.dataset_id)
        return render_card(
            model_name=job.model_name,
            job_id=job.id,
            dataset={
                "id": dataset.id,
                "name": dataset.name,
                "classes": dataset.classes,
                "class_counts": dataset.class_counts,
                "num_images": dataset.num_images,
            },
            spec=job.spec,
            plan=job.plan,
            metrics=metrics,
            history=epoch_history(session, job_id=job.id),
            onnx=onnx,
        )


def _end_cancelled(context: AppContext, *, job_id: str, attempt: int) -> None:
    with context.db.session() as session:
        ended = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.attempt == attempt, Job.status == "cancelling")
            .values(status="cancelled", finished_at=utcnow())
        )
        if ended.rowcount == 1:  # type: ignore[attr-defined]
            job = session.get_one(Job, job_id)
            record_event(session, job=job, kind="status", data={"status": "cancelled"})
        session.commit()
    context.store.delete(job_files_prefix(job_id))


def _failure_reason(exc: Exception) -> dict[str, str]:
    text = str(exc)
    if isinstance(exc, MemoryError) or "out of memory" in text.lower():
        return {
            "code": "out_of_memory",
            "message": "Training ran out of memory: lower batch_size or image_size and resubmit.",
        }
    if isinstance(exc, FileNotFoundError):
        # Both the dataset and a parent model version (chained transfer, lwf) are read from
        # storage; either may have been deleted after the job was queued.
        return {
            "code": "files_missing",
            "message": f"A file the job reads is gone from storage ({exc.filename}): upload the "
            "dataset again, or choose a base model version that still exists, and resubmit.",
        }
    return {"code": "training_error", "message": f"Training failed: {type(exc).__name__}: {text}"}
