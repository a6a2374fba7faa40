"""Gives back work whose worker vanished: jobs with expired leases, and queue messages lost with
an embedded broker or a flushed Redis. Safe to run in every API replica at once: each change is a
conditional update, and a duplicate task message is a no-op for the worker that receives it."""

import logging
import threading

from sqlalchemy import select, update

from service.context import AppContext
from service.db import utcnow
from service.jobs.service import record_event
from service.tables import Dataset, Job

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 3


def reap_expired_leases(context: AppContext) -> int:
    """Re-queue running jobs whose lease expired; returns how many were re-queued."""
    from worker.celery_app import TRAIN_TASK

    requeued: list[Job] = []
    with context.db.session() as session:
        expired = session.scalars(
            select(Job).where(
                Job.status.in_(("running", "cancelling")), Job.lease_expires_at < utcnow()
            )
        ).all()
        for job in expired:
            if job.status == "cancelling":
                values = {"status": "cancelled", "finished_at": utcnow()}
            elif job.attempt >= MAX_ATTEMPTS:
                values = {
                    "status": "failed",
                    "finished_at": utcnow(),
                    "error_code": "worker_lost",
                    "error_message": f"The worker running this job was lost {job.attempt} times; "
                    "the job may be crashing its worker (memory?): lower batch_size or image_size.",
                }
            else:
                values = {"status": "queued", "lease_owner": None, "lease_expires_at": None}
            changed = session.execute(
                update(Job)
                .where(Job.id == job.id, Job.attempt == job.attempt, Job.status == job.status)
                .values(**values)
            )
            if changed.rowcount == 1:  # type: ignore[attr-defined]
                record_event(
                    session,
                    job=job,
                    kind="status",
                    data={"status": values["status"], "reason": "lease_expired"},
                )
                if values["status"] == "queued":
                    requeued.append(job)
        session.commit()
    for job in requeued:
        context.celery.send_task(TRAIN_TASK, args=[job.id], queue=job.queue)
    return len(requeued)


def resend_pending(context: AppContext) -> None:
    """Re-send a task message for every queued job and processing dataset (e.g. at start-up)."""
    from worker.celery_app import INGEST_TASK, TRAIN_TASK

    with context.db.session() as session:
        jobs = session.execute(select(Job.id, Job.queue).where(Job.status == "queued")).all()
        datasets = session.scalars(select(Dataset.id).where(Dataset.status == "processing")).all()
    for job_id, queue in jobs:
        context.celery.send_task(TRAIN_TASK, args=[job_id], queue=queue)
    for dataset_id in datasets:
        context.celery.send_task(INGEST_TASK, args=[dataset_id])
    if jobs or datasets:
        logger.info("re-sent %d queued jobs and %d datasets", len(jobs), len(datasets))


def start_reaper(
    context: AppContext, *, interval: float, stop: threading.Event
) -> threading.Thread:
    def loop() -> None:
        while not stop.wait(interval):
            try:
                reap_expired_leases(context)
            except Exception:
                logger.exception("reaper pass failed; will retry")

    thread = threading.Thread(target=loop, name="thaw-reaper", daemon=True)
    thread.start()
    return thread
