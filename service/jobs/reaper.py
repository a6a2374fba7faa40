"""Ends or gives back work whose worker is gone, from the API process, every
`THAW_REAPER_INTERVAL_SECONDS`:

- jobs past their deadline fail with `deadline_exceeded`;
- jobs whose lease expired are re-queued, or fail with `worker_lost` once their workers have
  vanished `THAW_MAX_WORKER_LOSSES` times (a job that kills its worker must not loop);
- datasets whose ingest lease expired (`service/datasets/lease.py`) are sent to the
  `datasets` queue again, or fail with `worker_lost` after `THAW_MAX_WORKER_LOSSES` lost workers;
- experiments move on (`service.experiments.service.advance`): trials ended by the above, or
  cancelled directly, are noted and the next pending trials start; updates from feedback
  (`service.updates.service.advance`) start their job once their dataset is ready;
- when the broker lost its messages (Redis restarted or flushed), every queued job and
  processing dataset is sent again: the database, not the broker, holds what is pending;
- on a fleet (Redis shared), a queued job whose queue no live worker consumes (workers announce
  their queues, `queues.py`) becomes `waiting_for_worker`, and `queued` again, its task re-sent,
  once one does; a job queued longer than `THAW_QUEUE_RESEND_SECONDS` has its task sent again
  (the message may have been lost without the broker restarting), with a `resent` event.

Safe in every API replica at once: each change is a conditional update, and a duplicate task
message is a no-op for the worker that receives it (it cannot claim a job that is not queued).
"""

import logging
import threading
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.context import AppContext
from service.datasets import lease as ingest_lease
from service.datasets.service import archive_key
from service.db import utcnow
from service.experiments.service import advance_all as advance_experiments
from service.jobs import transitions
from service.jobs.service import discard_job_files
from service.jobs.states import ACTIVE_STATUSES, LEASED_STATUSES, IllegalTransitionError, JobStatus
from service.queues import INGEST_TASK, TRAIN_TASK, RedisConsumers
from service.tables import Dataset, Job, JobEvent
from service.updates.service import advance_all as advance_updates

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


def reap_expired_ingests(context: AppContext) -> int:
    """Send again each dataset whose ingest lease expired (its worker died mid-ingest), or fail
    it after too many lost workers; returns how many were sent again."""
    now = utcnow()
    resend: list[str] = []
    failed: list[str] = []
    with context.db.session() as session:
        expired = session.scalars(
            select(Dataset).where(Dataset.status == "processing", Dataset.lease_expires_at < now)
        ).all()
        for dataset in expired:
            outcome = ingest_lease.expire(
                session,
                dataset=dataset,
                max_worker_losses=context.settings.max_worker_losses,
                now=now,
            )
            if outcome == "processing":
                resend.append(dataset.id)
            elif outcome == "failed":
                failed.append(dataset.id)
        session.commit()
    for dataset_id in resend:
        logger.warning("dataset %s lost its ingest worker; sending it again", dataset_id)
        context.celery.send_task(INGEST_TASK, args=[dataset_id])
    for dataset_id in failed:
        logger.warning("dataset %s failed: its ingest workers kept vanishing", dataset_id)
        context.store.delete(archive_key(dataset_id))
    return len(resend)


def match_jobs_to_live_workers(context: AppContext) -> None:
    """Mark queued jobs no live worker can take as `waiting_for_worker`, put waiting ones
    back in the queue when a worker can, and re-send those queued too long. Fleet only."""
    url = context.settings.shared_redis_url
    if url is None:
        return
    live = RedisConsumers(url).live()
    now = utcnow()
    stale_before = now - timedelta(seconds=context.settings.queue_resend_seconds)
    send: list[tuple[str, str]] = []
    with context.db.session() as session:
        pending = session.execute(
            select(Job.id, Job.queue, Job.status).where(
                Job.status.in_([JobStatus.QUEUED, JobStatus.WAITING_FOR_WORKER])
            )
        ).all()
        last_sent = _last_sent(session, [job_id for job_id, _, _ in pending])
        for job_id, queue, status in pending:
            try:
                if status == JobStatus.QUEUED and queue not in live:
                    transitions.wait_for_worker(session, job_id=job_id, queue=queue)
                elif status == JobStatus.WAITING_FOR_WORKER and queue in live:
                    transitions.worker_found(session, job_id=job_id, queue=queue)
                    send.append((job_id, queue))
                elif status == JobStatus.QUEUED and last_sent.get(job_id, now) < stale_before:
                    waited = (now - last_sent[job_id]).total_seconds()
                    session.add(
                        JobEvent(
                            job_id=job_id,
                            kind="resent",
                            data={"queue": queue, "queued_seconds": round(waited)},
                        )
                    )
                    send.append((job_id, queue))
            except IllegalTransitionError as exc:
                logger.info("reaper left a job as it is: %s", exc)
        session.commit()
    for job_id, queue in send:
        context.celery.send_task(TRAIN_TASK, args=[job_id], queue=queue)


def _last_sent(session: Session, job_ids: list[str]) -> dict[str, datetime]:
    """When each job was last queued or re-sent: its latest status or `resent` event."""
    if not job_ids:
        return {}
    rows = session.execute(
        select(JobEvent.job_id, func.max(JobEvent.created_at).label("last"))
        .where(JobEvent.job_id.in_(job_ids), JobEvent.kind.in_(["status", "resent"]))
        .group_by(JobEvent.job_id)
    ).all()
    return {row.job_id: row.last for row in rows}


def resend_pending(context: AppContext) -> None:
    """Re-send a task message for every queued (or waiting) job and processing dataset."""
    with context.db.session() as session:
        jobs = session.execute(
            select(Job.id, Job.queue).where(
                Job.status.in_([JobStatus.QUEUED, JobStatus.WAITING_FOR_WORKER])
            )
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
    reap_expired_ingests(context)
    # Experiments whose trials ended here, or were cancelled directly, move on.
    advance_experiments(context)
    advance_updates(context)
    if broker_started_empty(context):
        logger.warning("the broker lost its messages; re-sending pending work from the database")
        resend_pending(context)
    match_jobs_to_live_workers(context)


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
