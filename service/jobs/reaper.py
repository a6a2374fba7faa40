"""Ends or gives back work whose worker is gone, from the API process, every
`THAW_REAPER_INTERVAL_SECONDS`:

- jobs past their deadline fail with `deadline_exceeded`;
- jobs whose lease expired are re-queued, or fail with `worker_lost` once their workers have
  vanished `THAW_MAX_WORKER_LOSSES` times (a job that kills its worker must not loop);
- experiments move on (`service.experiments.service.advance`): trials ended by the above, or
  cancelled directly, are noted and the next pending trials start;
- when the broker lost its messages (Redis restarted or flushed), every queued job and
  processing dataset is sent again: the database, not the broker, holds what is pending.

Safe in every API replica at once: each change is a conditional update, and a duplicate task
message is a no-op for the worker that receives it (it cannot claim a job that is not queued).
"""

import logging
import threading

from sqlalchemy import select

from service.context import AppContext
from service.db import utcnow
from service.experiments.service import advance_all as advance_experiments
from service.jobs import transitions
from service.jobs.service import discard_job_files
from service.jobs.states import ACTIVE_STATUSES, LEASED_STATUSES, IllegalTransitionError, JobStatus
from service.queues import INGEST_TASK, TRAIN_TASK
from service.tables import Dataset, Job

logger = logging.getLogger(__name__)

BROKER_MARKER = "thaw:broker-marker"
"""A key kept in the broker: when it is missing, the broker started empty."""


def fail_overdue_jobs(context: AppContext) -> int:
    """End every unfinished job past its deadline; returns how many were ended."""
    now = utcnow()
    ended: list[str] = []
    with context.db.session() as session:
        overdue = session.scalars(
            select(Job).where(Job.status.in_(sorted(ACTIVE_STATUSES)), Job.deadline_at < now)
        ).all()
        for job in overdue:
            try:
                transitions.exceed_deadline(session, job=job, now=now)
            except IllegalTransitionError as exc:
                # Another replica, or the job's worker, changed it since this pass read it.
                logger.info("reaper left a job as it is: %s", exc)
                continue
            ended.append(job.id)
        session.commit()
    for job_id in ended:
        discard_job_files(context=context, job_id=job_id)
    return len(ended)


def reap_expired_leases(context: AppContext) -> int:
    """Re-queue running jobs whose lease expired; returns how many were re-queued."""
    now = utcnow()
    requeued: list[Job] = []
    ended: list[str] = []
    with context.db.session() as session:
        expired = session.scalars(
            select(Job).where(Job.status.in_(sorted(LEASED_STATUSES)), Job.lease_expires_at < now)
        ).all()
        for job in expired:
            try:
                changed = transitions.expire_lease(
                    session, job=job, max_worker_losses=context.settings.max_worker_losses, now=now
                )
            except IllegalTransitionError as exc:
                # Another replica, or the job's worker, changed it since this pass read it.
                logger.info("reaper left a job as it is: %s", exc)
                continue
            if changed.status == JobStatus.QUEUED:
                requeued.append(changed)
            else:
                ended.append(changed.id)
        session.commit()
    for job in requeued:
        context.celery.send_task(TRAIN_TASK, args=[job.id], queue=job.queue)
    for job_id in ended:
        discard_job_files(context=context, job_id=job_id)
    return len(requeued)


def resend_pending(context: AppContext) -> None:
    """Re-send a task message for every queued job and processing dataset."""
    with context.db.session() as session:
        jobs = session.execute(
            select(Job.id, Job.queue).where(Job.status == JobStatus.QUEUED)
        ).all()
        datasets = session.scalars(select(Dataset.id).where(Dataset.status == "processing")).all()
    for job_id, queue in jobs:
        context.celery.send_task(TRAIN_TASK, args=[job_id], queue=queue)
    for dataset_id in datasets:
        context.celery.send_task(INGEST_TASK, args=[dataset_id])
    if jobs or datasets:
        logger.info("re-sent %d queued jobs and %d datasets", len(jobs), len(datasets))


def broker_started_empty(context: AppContext) -> bool:
    """True once each time a Redis broker comes up without its data (restarted or flushed).

    The embedded folder broker keeps its files; `thaw serve` re-sends at start-up instead.
    """
    with context.celery.connection_for_write() as connection:
        client = getattr(connection.default_channel, "client", None)
        if client is None:
            return False
        return bool(client.set(BROKER_MARKER, "1", nx=True))


def reap(context: AppContext) -> None:
    # Deadlines first: a job both overdue and abandoned fails rather than runs again.
    fail_overdue_jobs(context)
    reap_expired_leases(context)
    # Experiments whose trials ended here, or were cancelled directly, move on.
    advance_experiments(context)
    if broker_started_empty(context):
        logger.warning("the broker lost its messages; re-sending pending work from the database")
        resend_pending(context)


def start_reaper(
    context: AppContext, *, interval: float, stop: threading.Event
) -> threading.Thread:
    def loop() -> None:
        while not stop.wait(interval):
            try:
                reap(context)
            except Exception:
                logger.exception("reaper pass failed; will retry")

    thread = threading.Thread(target=loop, name="thaw-reaper", daemon=True)
    thread.start()
    return thread
