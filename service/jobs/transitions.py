"""Every change of a job's status, as one conditional update that records its status event.

The API, the reaper and the worker all change a job's status here and nowhere else. Each
function updates the row only if the job is in a state the transition may start from
(`states.SOURCES`) and, when fenced (`states.FENCED`), still on the attempt the caller saw; if
not, it raises `IllegalTransitionError` having written nothing. Each works in the caller's session
and leaves the commit to it, so a caller can make a change part of a larger transaction (the
reaper's pass, a published model version).
"""

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, case, literal, select, update
from sqlalchemy.orm import Session

from service.db import UTCDateTime, utcnow
from service.jobs.states import (
    FENCED,
    SOURCES,
    IllegalTransitionError,
    JobStatus,
    Transition,
)
from service.tables import Job, JobEvent
from service.webhooks.outbox import emit


def _apply(
    session: Session,
    transition: Transition,
    *,
    job_id: str,
    values: dict[str, Any],
    attempt: int | None = None,
    sources: frozenset[JobStatus] | None = None,
    also: tuple[ColumnElement[bool], ...] = (),
) -> Job:
    """Update the job if `transition` may start from its state (narrowed to `sources`), on
    `attempt` for fenced transitions, and `also` holds: the updated job, or
    IllegalTransitionError having written nothing."""
    # Each function here passes an attempt exactly when its transition is fenced.
    assert (attempt is not None) == (transition in FENCED), transition
    allowed = SOURCES[transition] if sources is None else sources & SOURCES[transition]
    conditions = [Job.id == job_id, Job.status.in_(sorted(allowed)), *also]
    if attempt is not None:
        conditions.append(Job.attempt == attempt)
    updated = session.scalars(
        update(Job)
        .where(*conditions)
        .values(**values)
        .returning(Job)
        .execution_options(populate_existing=True)
    ).one_or_none()
    if updated is None:
        found = session.execute(
            select(Job.status, Job.attempt).where(Job.id == job_id)
        ).one_or_none()
        raise IllegalTransitionError(
            job_id=job_id,
            transition=transition,
            from_status=None if found is None else found.status,
            attempt=attempt,
            current_attempt=None if found is None else found.attempt,
        )
    return updated


def _record_status(session: Session, job: Job, data: dict[str, Any]) -> None:
    session.add(JobEvent(job_id=job.id, kind="status", attempt=job.attempt, data=data))
    if data["status"] in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        event = {"job_id": job.id, "model": job.model_name, **data}
        emit(session, tenant_id=job.tenant_id, event=f"job.{data['status']}", data=event)


def _at(moment: datetime) -> ColumnElement[datetime]:
    # Typed, so a time inside a CASE is stored like every other (naive UTC; see UTCDateTime).
    return literal(moment, UTCDateTime())


def create(session: Session, *, job: Job) -> Job:
    """Add a new job, `queued`."""
    job.status = JobStatus.QUEUED
    session.add(job)
    session.flush()
    _record_status(session, job, {"status": JobStatus.QUEUED})
    return job


def claim(session: Session, *, job_id: str, owner: str, lease: timedelta) -> Job:
    """`queued` (or `waiting_for_worker`) → `running` as a new attempt of `owner`, whose lease
    lasts `lease`."""
    now = utcnow()
    job = _apply(
        session,
        Transition.CLAIM,
        job_id=job_id,
        values={
            "status": JobStatus.RUNNING,
            "attempt": Job.attempt + 1,
            "lease_owner": owner,
            "lease_expires_at": now + lease,
        },
    )
    # The deadline runs from the first start, across hand-backs and lost workers.
    if job.started_at is None:
        job.started_at = now
        job.deadline_at = now + timedelta(seconds=job.max_runtime_seconds)
    _record_status(session, job, {"status": JobStatus.RUNNING, "worker": owner})
    return job


def renew(session: Session, *, job_id: str, attempt: int, lease: timedelta, progress: float) -> Job:
    """`running` stays `running` for `attempt`: its lease extended by `lease`, its progress set.

    No event: renewals are frequent and say nothing new.
    """
    return _apply(
        session,
        Transition.RENEW,
        job_id=job_id,
        attempt=attempt,
        values={"lease_expires_at": utcnow() + lease, "progress": progress},
    )


def wait_for_worker(session: Session, *, job_id: str, queue: str) -> Job:
    """`queued` → `waiting_for_worker`: no live worker consumes `queue` (the reaper saw)."""
    job = _apply(
        session,
        Transition.WAIT_FOR_WORKER,
        job_id=job_id,
        values={"status": JobStatus.WAITING_FOR_WORKER},
    )
    _record_status(
        session,
        job,
        {
            "status": JobStatus.WAITING_FOR_WORKER,
            "queue": queue,
            "reason": f"no live worker consumes the {queue!r} queue",
        },
    )
    return job


def worker_found(session: Session, *, job_id: str, queue: str) -> Job:
    """`waiting_for_worker` → `queued`: a live worker consumes `queue` again."""
    job = _apply(
        session, Transition.WORKER_FOUND, job_id=job_id, values={"status": JobStatus.QUEUED}
    )
    _record_status(session, job, {"status": JobStatus.QUEUED, "queue": queue})
    return job


def request_cancel(session: Session, *, job_id: str) -> Job:
    """`queued` or `waiting_for_worker` → `cancelled` at once; `running` → `cancelling`, which
    its worker sees between steps; `cancelling` stays so."""
    queued = Job.status.in_([JobStatus.QUEUED, JobStatus.WAITING_FOR_WORKER])
    job = _apply(
        session,
        Transition.CANCEL,
        job_id=job_id,
        values={
            "status": case(
                (queued, literal(JobStatus.CANCELLED.value)),
                else_=literal(JobStatus.CANCELLING.value),
            ),
            "finished_at": case((queued, _at(utcnow())), else_=Job.finished_at),
        },
    )
    _record_status(session, job, {"status": job.status})
    return job


def hand_back(session: Session, *, job_id: str, attempt: int, progress: float) -> Job:
    """`running` → `queued` for another worker: `attempt`'s worker is shutting down (it saved a
    checkpoint where it stopped)."""
    job = _apply(
        session,
        Transition.HAND_BACK,
        job_id=job_id,
        attempt=attempt,
        values={
            "status": JobStatus.QUEUED,
            "lease_owner": None,
            "lease_expires_at": None,
            "progress": progress,
        },
    )
    _record_status(session, job, {"status": JobStatus.QUEUED, "reason": "worker_shutdown"})
    return job


def finish_cancel(session: Session, *, job_id: str, attempt: int, progress: float) -> Job:
    """`cancelling` → `cancelled`: `attempt`'s worker stopped, `progress` of the way through."""
    job = _apply(
        session,
        Transition.FINISH_CANCEL,
        job_id=job_id,
        attempt=attempt,
        values={"status": JobStatus.CANCELLED, "finished_at": utcnow(), "progress": progress},
    )
    _record_status(session, job, {"status": JobStatus.CANCELLED})
    return job


def expire_lease(session: Session, *, job: Job, max_worker_losses: int, now: datetime) -> Job:
    """The worker holding `job` (as the reaper read it) is gone: its lease expired before `now`.

    `cancelling` → `cancelled`; `running` → `queued` to run again, or `failed` with
    `worker_lost` once `max_worker_losses` workers were lost (a job that kills its worker must
    not loop). Fenced by the attempt and status read, so a change since then wins.
    """
    losses = job.worker_losses + 1
    values: dict[str, Any]
    if job.status == JobStatus.CANCELLING:
        values = {"status": JobStatus.CANCELLED, "finished_at": now}
    elif losses >= max_worker_losses:
        values = {
            "status": JobStatus.FAILED,
            "finished_at": now,
            "worker_losses": losses,
            "error_code": "worker_lost",
            "error_message": f"The worker running this job vanished {losses} times; "
            "the job may be crashing it (out of memory?): lower batch_size or "
            "image_size and resubmit.",
        }
    else:
        values = {
            "status": JobStatus.QUEUED,
            "worker_losses": losses,
            "lease_owner": None,
            "lease_expires_at": None,
        }
    changed = _apply(
        session,
        Transition.EXPIRE_LEASE,
        job_id=job.id,
        attempt=job.attempt,
        sources=frozenset({job.status}),
        also=(Job.lease_expires_at < now,),
        values=values,
    )
    _record_status(session, changed, {"status": changed.status, "reason": "lease_expired"})
    return changed


def exceed_deadline(session: Session, *, job: Job, now: datetime) -> Job:
    """`job` (as the reaper read it) is past its deadline at `now`: `cancelling` → `cancelled`,
    `queued` or `running` → `failed` with `deadline_exceeded`. Fenced by the attempt and status
    read."""
    values: dict[str, Any]
    if job.status == JobStatus.CANCELLING:
        values = {"status": JobStatus.CANCELLED, "finished_at": now}
    else:
        values = {
            "status": JobStatus.FAILED,
            "finished_at": now,
            "error_code": "deadline_exceeded",
            "error_message": f"The job did not finish within {job.max_runtime_seconds}s "
            "of its first start: resubmit with a larger max_runtime_seconds, or fewer "
            "epochs or a smaller image_size.",
        }
    changed = _apply(
        session,
        Transition.EXCEED_DEADLINE,
        job_id=job.id,
        attempt=job.attempt,
        sources=frozenset({job.status}),
        also=(Job.deadline_at < now,),
        values=values,
    )
    _record_status(session, changed, {"status": changed.status, "reason": "deadline_exceeded"})
    return changed


def fail(session: Session, *, job_id: str, attempt: int, code: str, message: str) -> Job:
    """`running` or `cancelling` → `failed` with `code`: `attempt`'s worker could not go on."""
    return _end_failed(
        session, Transition.FAIL, job_id=job_id, attempt=attempt, code=code, message=message
    )


def fail_unsent(session: Session, *, job_id: str, code: str, message: str) -> Job:
    """`queued` → `failed` with `code`: the job's task could not be sent to the queue."""
    return _end_failed(session, Transition.FAIL_UNSENT, job_id=job_id, code=code, message=message)


def _end_failed(
    session: Session,
    transition: Transition,
    *,
    job_id: str,
    code: str,
    message: str,
    attempt: int | None = None,
) -> Job:
    job = _apply(
        session,
        transition,
        job_id=job_id,
        attempt=attempt,
        values={
            "status": JobStatus.FAILED,
            "error_code": code,
            "error_message": message,
            "finished_at": utcnow(),
        },
    )
    _record_status(session, job, {"status": JobStatus.FAILED, "code": code})
    return job


def succeed(
    session: Session,
    *,
    job_id: str,
    attempt: int,
    version_id: str,
    register_version: Callable[[Job], int],
) -> Job:
    """`running` → `succeeded` for `attempt`, which published model version `version_id`.

    `register_version(job)` writes that version in this transaction once the job is known to be
    this attempt's, and returns its number, which the status event names.
    """
    job = _apply(
        session,
        Transition.SUCCEED,
        job_id=job_id,
        attempt=attempt,
        values={
            "status": JobStatus.SUCCEEDED,
            "progress": 1.0,
            "finished_at": utcnow(),
            "model_version_id": version_id,
        },
    )
    number = register_version(job)
    # The version belongs to the job's model, the one it was submitted to train.
    _record_status(
        session, job, {"status": JobStatus.SUCCEEDED, "model": job.model_name, "version": number}
    )
    return job


def succeed_with_result(
    session: Session, *, job_id: str, attempt: int, kind: str, result: dict[str, Any]
) -> Job:
    """`running` → `succeeded` for `attempt` of a job that publishes no model version (an
    `lr_find` job): its `result` is recorded as an event of `kind` before the status event."""
    job = _apply(
        session,
        Transition.SUCCEED,
        job_id=job_id,
        attempt=attempt,
        values={"status": JobStatus.SUCCEEDED, "progress": 1.0, "finished_at": utcnow()},
    )
    session.add(JobEvent(job_id=job.id, kind=kind, attempt=job.attempt, data=result))
    _record_status(session, job, {"status": JobStatus.SUCCEEDED})
    return job
