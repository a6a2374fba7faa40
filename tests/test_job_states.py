"""The job's state machine, walked whole on SQLite and Postgres: every transition from every
state, and from a stale attempt where it is fenced. A legal one changes the row and records its
status event; an illegal one raises IllegalTransitionError and changes nothing at all."""

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from service.cli import migrate_database
from service.context import AppContext
from service.db import Database, new_id, utcnow
from service.jobs import transitions
from service.jobs.states import (
    FENCED,
    SOURCES,
    IllegalTransitionError,
    JobStatus,
    Transition,
)
from service.models.service import publish_version
from service.settings import Settings
from service.tables import (
    Dataset,
    Job,
    JobEvent,
    ModelVersion,
    RegisteredModel,
    Tenant,
    Webhook,
    WebhookDelivery,
)
from tests.conftest import fresh_postgres_database

LEASE = timedelta(seconds=30)
MAX_WORKER_LOSSES = 3
ALL = frozenset(JobStatus)
LEASED = frozenset({JobStatus.RUNNING, JobStatus.CANCELLING})
WAITING = JobStatus.WAITING_FOR_WORKER
ACTIVE = frozenset({JobStatus.QUEUED, WAITING, JobStatus.RUNNING, JobStatus.CANCELLING})

EXPECTED_SOURCES = {
    Transition.CREATE: frozenset(),
    Transition.CLAIM: frozenset({JobStatus.QUEUED, WAITING}),
    Transition.WAIT_FOR_WORKER: frozenset({JobStatus.QUEUED}),
    Transition.WORKER_FOUND: frozenset({WAITING}),
    Transition.RENEW: frozenset({JobStatus.RUNNING}),
    Transition.CANCEL: ACTIVE,
    Transition.HAND_BACK: frozenset({JobStatus.RUNNING}),
    Transition.FINISH_CANCEL: frozenset({JobStatus.CANCELLING}),
    Transition.EXPIRE_LEASE: LEASED,
    Transition.EXCEED_DEADLINE: ACTIVE,
    Transition.FAIL: LEASED,
    Transition.FAIL_UNSENT: frozenset({JobStatus.QUEUED}),
    Transition.SUCCEED: frozenset({JobStatus.RUNNING}),
}
"""The machine as issue 16 and DESIGN describe it, written out independently of the module."""


JOB_FIELDS: dict[str, Any] = {
    "model_name": "digits",
    "base_model": "efficientnet_lite0",
    "strategy": "feature_extraction",
    "spec": {},
    "plan": {},
    "queue": "cpu",
    "max_runtime_seconds": 600,
}
"""What every job row here has besides its tenant, dataset and state."""


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Database]:
    data_dir = tmp_path_factory.mktemp("states") / "data"
    if request.param == "sqlite":
        yield from _migrated(Settings(data_dir=data_dir))
    else:
        with fresh_postgres_database() as url:
            yield from _migrated(Settings(data_dir=data_dir, database_url=url))


def _migrated(settings: Settings) -> Iterator[Database]:
    migrate_database(settings)
    database = Database(settings.resolved_database_url)
    yield database
    database.engine.dispose()


def new_job(
    database: Database,
    status: JobStatus,
    *,
    attempt: int = 1,
    worker_losses: int = 0,
    tenant_id: str | None = None,
) -> str:
    """A job put straight into `status`, its lease and deadline already past, so that only its
    status and attempt decide whether a transition may happen."""
    past = utcnow() - timedelta(minutes=5)
    with database.session() as session:
        if tenant_id is None:
            tenant = Tenant(name=new_id("team"))
            session.add(tenant)
            session.flush()
            tenant_id = tenant.id
        dataset = Dataset(tenant_id=tenant_id, name="digits", status="ready")
        session.add(dataset)
        session.flush()
        job = Job(
            tenant_id=tenant_id,
            dataset_id=dataset.id,
            **JOB_FIELDS,
            status=status,
            attempt=attempt,
            worker_losses=worker_losses,
            lease_owner="host:1" if status in LEASED else None,
            lease_expires_at=past if status in LEASED else None,
            started_at=past if attempt else None,
            deadline_at=past if attempt else None,
        )
        session.add(job)
        session.commit()
        return job.id


def snapshot(database: Database, job_id: str) -> tuple[dict[str, Any], list[tuple[str, int, Any]]]:
    """Everything a transition may write: the job's row and its events."""
    with database.session() as session:
        job = session.get_one(Job, job_id)
        row = {column.key: getattr(job, column.key) for column in Job.__table__.columns}
        events = session.execute(
            select(JobEvent.kind, JobEvent.attempt, JobEvent.data)
            .where(JobEvent.job_id == job_id)
            .order_by(JobEvent.id)
        ).all()
    return row, [tuple(event) for event in events]


Call = Callable[[Session, Job, int], Job]
"""A transition made by a caller that read `job` and works as attempt `int`."""

CALLS: dict[Transition, Call] = {
    Transition.CLAIM: lambda s, job, _: transitions.claim(
        s, job_id=job.id, owner="host:2", lease=LEASE
    ),
    Transition.RENEW: lambda s, job, attempt: transitions.renew(
        s, job_id=job.id, attempt=attempt, lease=LEASE, progress=0.5
    ),
    Transition.WAIT_FOR_WORKER: lambda s, job, _: transitions.wait_for_worker(
        s, job_id=job.id, queue="gpu"
    ),
    Transition.WORKER_FOUND: lambda s, job, _: transitions.worker_found(
        s, job_id=job.id, queue="gpu"
    ),
    Transition.CANCEL: lambda s, job, _: transitions.request_cancel(s, job_id=job.id),
    Transition.HAND_BACK: lambda s, job, attempt: transitions.hand_back(
        s, job_id=job.id, attempt=attempt, progress=0.4
    ),
    Transition.FINISH_CANCEL: lambda s, job, attempt: transitions.finish_cancel(
        s, job_id=job.id, attempt=attempt, progress=0.3
    ),
    Transition.EXPIRE_LEASE: lambda s, job, _: transitions.expire_lease(
        s, job=job, max_worker_losses=MAX_WORKER_LOSSES, now=utcnow()
    ),
    Transition.EXCEED_DEADLINE: lambda s, job, _: transitions.exceed_deadline(
        s, job=job, now=utcnow()
    ),
    Transition.FAIL: lambda s, job, attempt: transitions.fail(
        s, job_id=job.id, attempt=attempt, code="training_error", message="Training failed."
    ),
    Transition.FAIL_UNSENT: lambda s, job, _: transitions.fail_unsent(
        s, job_id=job.id, code="broker_unavailable", message="The queue was unreachable."
    ),
    Transition.SUCCEED: lambda s, job, attempt: transitions.succeed(
        s,
        job_id=job.id,
        attempt=attempt,
        version_id="mv_1",
        # The version is registered for this very job (a KeyError for any other).
        register_version=lambda registered: {job.id: 3}[registered.id],
    ),
}


@dataclass(frozen=True)
class Outcome:
    status: JobStatus
    event: dict[str, Any] | None
    """The status event recorded; None when the transition records none."""
    columns: dict[str, Any]
    """Other columns that must hold these values after it."""


def expected(transition: Transition, source: JobStatus, before: dict[str, Any]) -> Outcome:
    attempt = before["attempt"]
    if transition is Transition.CLAIM:
        return Outcome(
            JobStatus.RUNNING,
            {"status": "running", "worker": "host:2"},
            {"attempt": attempt + 1, "lease_owner": "host:2", "started_at": before["started_at"]},
        )
    if transition is Transition.WAIT_FOR_WORKER:
        return Outcome(
            WAITING,
            {
                "status": "waiting_for_worker",
                "queue": "gpu",
                "reason": "no live worker consumes the 'gpu' queue",
            },
            {"attempt": attempt},
        )
    if transition is Transition.WORKER_FOUND:
        return Outcome(JobStatus.QUEUED, {"status": "queued", "queue": "gpu"}, {})
    if transition is Transition.RENEW:
        return Outcome(JobStatus.RUNNING, None, {"progress": 0.5, "attempt": attempt})
    if transition is Transition.CANCEL:
        queued = source in (JobStatus.QUEUED, WAITING)
        status = JobStatus.CANCELLED if queued else JobStatus.CANCELLING
        return Outcome(status, {"status": str(status)}, {"attempt": attempt})
    if transition is Transition.HAND_BACK:
        return Outcome(
            JobStatus.QUEUED,
            {"status": "queued", "reason": "worker_shutdown"},
            {"lease_owner": None, "lease_expires_at": None, "progress": 0.4},
        )
    if transition is Transition.FINISH_CANCEL:
        return Outcome(JobStatus.CANCELLED, {"status": "cancelled"}, {"progress": 0.3})
    if transition is Transition.EXPIRE_LEASE:
        if source == JobStatus.CANCELLING:
            return Outcome(
                JobStatus.CANCELLED, {"status": "cancelled", "reason": "lease_expired"}, {}
            )
        return Outcome(
            JobStatus.QUEUED,
            {"status": "queued", "reason": "lease_expired"},
            {"worker_losses": 1, "lease_owner": None, "lease_expires_at": None},
        )
    if transition is Transition.EXCEED_DEADLINE:
        if source == JobStatus.CANCELLING:
            return Outcome(
                JobStatus.CANCELLED, {"status": "cancelled", "reason": "deadline_exceeded"}, {}
            )
        return Outcome(
            JobStatus.FAILED,
            {"status": "failed", "reason": "deadline_exceeded"},
            {"error_code": "deadline_exceeded"},
        )
    if transition is Transition.FAIL:
        return Outcome(
            JobStatus.FAILED,
            {"status": "failed", "code": "training_error"},
            {"error_code": "training_error", "error_message": "Training failed."},
        )
    if transition is Transition.FAIL_UNSENT:
        return Outcome(
            JobStatus.FAILED,
            {"status": "failed", "code": "broker_unavailable"},
            {"error_code": "broker_unavailable", "error_message": "The queue was unreachable."},
        )
    assert transition is Transition.SUCCEED
    return Outcome(
        JobStatus.SUCCEEDED,
        {"status": "succeeded", "model": "digits", "version": 3},
        {"progress": 1.0, "model_version_id": "mv_1"},
    )


ENDS = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}


def test_the_module_declares_the_expected_machine() -> None:
    assert SOURCES == EXPECTED_SOURCES
    assert set(CALLS) == set(Transition) - {Transition.CREATE}
    # Worker writes are fenced by attempt, and so are the reaper's, by the attempt it read.
    unfenced = {
        Transition.CREATE,
        Transition.CLAIM,
        Transition.CANCEL,
        Transition.FAIL_UNSENT,
        Transition.WAIT_FOR_WORKER,
        Transition.WORKER_FOUND,
    }
    assert set(Transition) - unfenced == FENCED


def test_create_records_a_queued_job(database: Database) -> None:
    queued = new_job(database, JobStatus.QUEUED, attempt=0)
    with database.session() as session:
        template = session.get_one(Job, queued)
        job = Job(
            tenant_id=template.tenant_id,
            dataset_id=template.dataset_id,
            **JOB_FIELDS,
        )
        transitions.create(session, job=job)
        session.commit()
    row, events = snapshot(database, job.id)
    assert row["status"] is JobStatus.QUEUED
    assert row["attempt"] == 0
    assert events == [("status", 0, {"status": "queued"})]


LEGAL = [(t, s) for t in CALLS for s in sorted(EXPECTED_SOURCES[t])]
ILLEGAL = [(t, s) for t in CALLS for s in sorted(ALL - EXPECTED_SOURCES[t])]


@pytest.mark.parametrize(("transition", "source"), LEGAL, ids=[f"{t}-from-{s}" for t, s in LEGAL])
def test_legal_transition_changes_the_job_and_records_its_event(
    database: Database, transition: Transition, source: JobStatus
) -> None:
    job_id = new_job(database, source)
    before, events_before = snapshot(database, job_id)
    started = utcnow()
    with database.session() as session:
        job = session.get_one(Job, job_id)
        returned = CALLS[transition](session, job, before["attempt"])
        session.commit()
    after, events_after = snapshot(database, job_id)

    outcome = expected(transition, source, before)
    assert returned.id == job_id
    assert returned.status == outcome.status
    assert after["status"] is outcome.status
    for column, value in outcome.columns.items():
        assert after[column] == value, column
    new_events = events_after[len(events_before) :]
    if outcome.event is None:
        assert new_events == []
    else:
        assert new_events == [("status", after["attempt"], outcome.event)]
    if outcome.status in ENDS and source not in ENDS:
        assert after["finished_at"] is not None
        assert after["finished_at"] >= started
    if outcome.status not in ENDS:
        # Only an ending sets a finish time, and nothing leaves an end: an active job has none.
        assert after["finished_at"] is None
    if transition in (Transition.CLAIM, Transition.RENEW):
        assert after["lease_expires_at"] >= started + LEASE


@pytest.mark.parametrize(
    ("transition", "source"), ILLEGAL, ids=[f"{t}-from-{s}" for t, s in ILLEGAL]
)
def test_illegal_transition_raises_and_changes_nothing(
    database: Database, transition: Transition, source: JobStatus
) -> None:
    job_id = new_job(database, source)
    before = snapshot(database, job_id)
    with database.session() as session:
        job = session.get_one(Job, job_id)
        with pytest.raises(IllegalTransitionError) as raised:
            CALLS[transition](session, job, before[0]["attempt"])
        session.commit()
    assert snapshot(database, job_id) == before
    assert raised.value.job_id == job_id
    assert raised.value.from_status is source
    assert raised.value.transition is transition


FENCED_LEGAL = [(t, s) for t, s in LEGAL if t in FENCED]


@pytest.mark.parametrize(
    ("transition", "source"), FENCED_LEGAL, ids=[f"{t}-from-{s}" for t, s in FENCED_LEGAL]
)
def test_fenced_transition_from_a_stale_attempt_raises_and_changes_nothing(
    database: Database, transition: Transition, source: JobStatus
) -> None:
    job_id = new_job(database, source, attempt=1)
    with database.session() as session:
        # The caller read the job as attempt 1; then another worker took it over as attempt 2.
        job = session.get_one(Job, job_id)
        with database.session() as other:
            other.execute(update(Job).where(Job.id == job_id).values(attempt=2))
            other.commit()
        before = snapshot(database, job_id)
        with pytest.raises(IllegalTransitionError) as raised:
            CALLS[transition](session, job, 1)
        session.commit()
    assert snapshot(database, job_id) == before
    assert (raised.value.attempt, raised.value.current_attempt) == (1, 2)
    assert raised.value.from_status is source


@pytest.mark.parametrize(
    ("from_status", "attempt", "current_attempt", "message"),
    [
        (None, None, None, "job j1: cannot fail: there is no such job"),
        (JobStatus.SUCCEEDED, None, None, "job j1: cannot fail: it is succeeded"),
        (JobStatus.RUNNING, 1, 1, "job j1: cannot fail as attempt 1: it is running"),
        (JobStatus.RUNNING, 1, 2, "job j1: cannot fail as attempt 1: it is running as attempt 2"),
    ],
)
def test_an_illegal_transition_says_what_was_tried_and_what_was_found(
    from_status: JobStatus | None, attempt: int | None, current_attempt: int | None, message: str
) -> None:
    """The reaper logs this text when it leaves a job as it is: the operator's only account."""
    error = IllegalTransitionError(
        job_id="j1",
        transition=Transition.FAIL,
        from_status=from_status,
        attempt=attempt,
        current_attempt=current_attempt,
    )
    assert str(error) == message


def test_the_first_claim_starts_the_deadline(database: Database) -> None:
    job_id = new_job(database, JobStatus.QUEUED, attempt=0)
    with database.session() as session:
        claimed = transitions.claim(session, job_id=job_id, owner="host:2", lease=LEASE)
        session.commit()
    row, _ = snapshot(database, job_id)
    assert row["attempt"] == claimed.attempt == 1
    assert row["started_at"] is not None
    assert row["deadline_at"] == row["started_at"] + timedelta(seconds=row["max_runtime_seconds"])


def test_lease_expiry_fails_the_job_once_workers_were_lost_too_often(database: Database) -> None:
    job_id = new_job(database, JobStatus.RUNNING, worker_losses=MAX_WORKER_LOSSES - 1)
    with database.session() as session:
        CALLS[Transition.EXPIRE_LEASE](session, session.get_one(Job, job_id), 1)
        session.commit()
    row, events = snapshot(database, job_id)
    assert (row["status"], row["error_code"], row["worker_losses"]) == (
        JobStatus.FAILED,
        "worker_lost",
        MAX_WORKER_LOSSES,
    )
    assert events[-1] == ("status", 1, {"status": "failed", "reason": "lease_expired"})


@pytest.mark.parametrize("transition", [Transition.EXPIRE_LEASE, Transition.EXCEED_DEADLINE])
def test_reaper_transitions_need_the_time_to_have_passed(
    database: Database, transition: Transition
) -> None:
    job_id = new_job(database, JobStatus.RUNNING)
    later = utcnow() + timedelta(minutes=5)
    with database.session() as session:
        # The worker renewed its lease, and the deadline is still ahead.
        session.execute(
            update(Job).where(Job.id == job_id).values(lease_expires_at=later, deadline_at=later)
        )
        session.commit()
    before = snapshot(database, job_id)
    with database.session() as session, pytest.raises(IllegalTransitionError):
        CALLS[transition](session, session.get_one(Job, job_id), 1)
    assert snapshot(database, job_id) == before


@pytest.mark.parametrize("transition", [Transition.EXPIRE_LEASE, Transition.EXCEED_DEADLINE])
def test_reaper_transitions_need_the_time_to_be_strictly_past(
    database: Database, transition: Transition
) -> None:
    """A lease or deadline ending at the very moment the reaper looks has not passed yet."""
    job_id = new_job(database, JobStatus.RUNNING)
    before = snapshot(database, job_id)
    lease_end, deadline = before[0]["lease_expires_at"], before[0]["deadline_at"]
    reap: dict[Transition, Callable[[Session, Job], Job]] = {
        Transition.EXPIRE_LEASE: lambda s, job: transitions.expire_lease(
            s, job=job, max_worker_losses=MAX_WORKER_LOSSES, now=lease_end
        ),
        Transition.EXCEED_DEADLINE: lambda s, job: transitions.exceed_deadline(
            s, job=job, now=deadline
        ),
    }
    with database.session() as session, pytest.raises(IllegalTransitionError):
        reap[transition](session, session.get_one(Job, job_id))
    assert snapshot(database, job_id) == before


@pytest.mark.parametrize("transition", [Transition.EXPIRE_LEASE, Transition.EXCEED_DEADLINE])
def test_a_reaper_transition_loses_to_a_status_change_since_its_read(
    database: Database, transition: Transition
) -> None:
    """The reaper read the job running; before its update, the job was asked to cancel (same
    attempt). Its values were chosen for a running job, so it must change nothing."""
    job_id = new_job(database, JobStatus.RUNNING)
    with database.session() as session:
        job = session.get_one(Job, job_id)
        with database.session() as other:
            transitions.request_cancel(other, job_id=job_id)
            other.commit()
        before = snapshot(database, job_id)
        with pytest.raises(IllegalTransitionError) as raised:
            CALLS[transition](session, job, 1)
        session.commit()
    assert snapshot(database, job_id) == before
    assert before[0]["status"] is JobStatus.CANCELLING
    assert raised.value.from_status is JobStatus.CANCELLING


def reap(database: Database, job_id: str, transition: Transition) -> dict[str, Any]:
    """Run a reaper transition (lease or deadline) on the job as attempt 1; its row after."""
    with database.session() as session:
        CALLS[transition](session, session.get_one(Job, job_id), 1)
        session.commit()
    return snapshot(database, job_id)[0]


def test_a_job_failed_for_lost_workers_says_how_often_and_what_to_change(
    database: Database,
) -> None:
    job_id = new_job(database, JobStatus.RUNNING, worker_losses=MAX_WORKER_LOSSES - 1)
    assert reap(database, job_id, Transition.EXPIRE_LEASE)["error_message"] == (
        "The worker running this job vanished 3 times; the job may be crashing it (out of "
        "memory?): lower batch_size or image_size and resubmit."
    )


def test_a_job_failed_at_its_deadline_says_how_long_it_had_and_what_to_change(
    database: Database,
) -> None:
    job_id = new_job(database, JobStatus.RUNNING)
    assert reap(database, job_id, Transition.EXCEED_DEADLINE)["error_message"] == (
        "The job did not finish within 600s of its first start: resubmit with a larger "
        "max_runtime_seconds, or fewer epochs or a smaller image_size."
    )


def test_a_job_that_ends_queues_its_webhook_event_for_its_own_tenant(database: Database) -> None:
    """Ending a job writes the tenant's webhook event in the same transaction; a tenant
    without a webhook gets none."""
    with database.session() as session:
        tenant = Tenant(name=new_id("team"))
        session.add(tenant)
        session.flush()
        session.add(Webhook(tenant_id=tenant.id, url="https://hooks.example/thaw", secret="s"))
        session.commit()
        tenant_id = tenant.id
    job_id = new_job(database, JobStatus.RUNNING, tenant_id=tenant_id)
    silent_id = new_job(database, JobStatus.RUNNING)
    for job in (job_id, silent_id):
        reap(database, job, Transition.EXCEED_DEADLINE)
    with database.session() as session:
        deliveries = session.scalars(select(WebhookDelivery)).all()
        sent = [(d.tenant_id, d.event, d.data) for d in deliveries if d.tenant_id == tenant_id]
        data = {"job_id": job_id, "model": "digits", "status": "failed"}
        assert sent == [(tenant_id, "job.failed", data | {"reason": "deadline_exceeded"})]
        silent_tenant = session.get_one(Job, silent_id).tenant_id
        assert all(d.tenant_id != silent_tenant for d in deliveries)


def test_a_transition_on_a_job_that_does_not_exist_says_so(database: Database) -> None:
    with database.session() as session, pytest.raises(IllegalTransitionError) as raised:
        transitions.succeed_with_result(
            session, job_id="job_nothing", attempt=1, kind="lr_find", result={}
        )
    assert (raised.value.from_status, raised.value.current_attempt) == (None, None)
    assert str(raised.value).endswith("there is no such job")


def test_a_cancelled_jobs_finish_time_is_utc_whatever_the_sessions_time_zone(
    database: Database,
) -> None:
    """The finish time that cancelling a queued job writes inside a CASE is stored as naive UTC
    like every other time: untyped, Postgres would take the aware time as `timestamptz` and store
    it in the session's time zone (a server not set to UTC). SQLite has no time zones."""
    job_id = new_job(database, JobStatus.QUEUED)
    started = utcnow()
    with database.session() as session:
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text("SET LOCAL TIME ZONE 'Asia/Kolkata'"))  # UTC+05:30
        transitions.request_cancel(session, job_id=job_id)
        session.commit()
    row, _ = snapshot(database, job_id)
    assert started <= row["finished_at"] <= utcnow()


def succeed_with_lr_result(session: Session, job_id: str, attempt: int) -> Job:
    return transitions.succeed_with_result(
        session, job_id=job_id, attempt=attempt, kind="lr_find", result={"lr": 0.01}
    )


def test_a_job_without_a_version_succeeds_with_its_result_before_its_status(
    database: Database,
) -> None:
    """An `lr_find` job: the same `succeed` transition, its result recorded as its own event."""
    job_id = new_job(database, JobStatus.RUNNING, attempt=2)
    started = utcnow()
    with database.session() as session:
        loaded = session.get_one(Job, job_id)  # the session's own object comes back, updated
        returned = succeed_with_lr_result(session, job_id, 2)
        assert returned is loaded
        assert (returned.status, returned.progress) == (JobStatus.SUCCEEDED, 1.0)
        session.commit()
    row, events = snapshot(database, job_id)
    assert returned.id == job_id
    assert (row["status"], row["progress"], row["attempt"]) == (JobStatus.SUCCEEDED, 1.0, 2)
    assert row["model_version_id"] is None
    assert row["finished_at"] >= started
    assert events == [("lr_find", 2, {"lr": 0.01}), ("status", 2, {"status": "succeeded"})]


@pytest.mark.parametrize(
    ("source", "attempt"),
    [
        (JobStatus.QUEUED, 1),
        (JobStatus.CANCELLING, 1),
        (JobStatus.SUCCEEDED, 1),
        (JobStatus.RUNNING, 2),
    ],
)
def test_a_result_from_another_state_or_attempt_changes_nothing(
    database: Database, source: JobStatus, attempt: int
) -> None:
    job_id = new_job(database, source, attempt=1)
    before = snapshot(database, job_id)
    with database.session() as session:
        with pytest.raises(IllegalTransitionError) as raised:
            succeed_with_lr_result(session, job_id, attempt)
        session.commit()
    assert snapshot(database, job_id) == before
    assert (raised.value.transition, raised.value.from_status) == (Transition.SUCCEED, source)
    assert (raised.value.attempt, raised.value.current_attempt) == (attempt, 1)


def test_a_stale_publish_writes_no_version(database: Database) -> None:
    job_id = new_job(database, JobStatus.CANCELLING)
    before = snapshot(database, job_id)
    with database.session() as session, pytest.raises(IllegalTransitionError):
        publish_version(
            session,
            job_id=job_id,
            attempt=1,
            version_id="mv_stale",
            metrics={"val_accuracy": 0.9},
            labels=["a", "b"],
            artifacts=[],
            artifact_prefix="models/x/attempt-1",
        )
    assert snapshot(database, job_id) == before
    with database.session() as session:
        assert session.get(ModelVersion, "mv_stale") is None
        tenant_id = session.get_one(Job, job_id).tenant_id
        assert (
            session.scalars(
                select(RegisteredModel).where(RegisteredModel.tenant_id == tenant_id)
            ).all()
            == []
        )


def test_cancelling_an_ended_job_is_409_and_changes_nothing(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    with context.db.session() as session:
        tenant_id = session.scalars(select(Tenant.id).where(Tenant.name == "team-a")).one()
    job_id = new_job(context.db, JobStatus.SUCCEEDED, tenant_id=tenant_id)
    before = snapshot(context.db, job_id)

    response = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth)

    assert response.status_code == 409
    assert response.json() == {
        "error": {
            "code": "job_not_cancellable",
            "message": f"Job {job_id} already ended as succeeded.",
            "param": "job_id",
        }
    }
    assert snapshot(context.db, job_id) == before


def test_importing_the_states_and_queue_names_builds_no_celery_app(tmp_path: Path) -> None:
    # `service.queues` is what the jobs router's service imports for queue and task names.
    code = (
        "import sys\n"
        "import service.jobs.states, service.jobs.transitions\n"
        "assert 'celery' not in sys.modules, 'the state machine imports Celery'\n"
        "import service.queues\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'worker'))\n"
    )
    env = {**os.environ, "THAW_DATA_DIR": str(tmp_path / "data")}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    # An app built on import would have made the folder broker's folders under the data dir.
    assert list(tmp_path.iterdir()) == []


def test_any_illegal_transition_reaching_the_api_is_a_409_envelope() -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from service.errors import install_error_handlers

    app = FastAPI()
    install_error_handlers(app)

    @app.post("/refused")
    def refused() -> None:
        raise IllegalTransitionError(
            job_id="job_1", transition=Transition.HAND_BACK, from_status=JobStatus.SUCCEEDED
        )

    response = TestClient(app).post("/refused")

    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "illegal_transition"
    assert error["param"] == "job_id"
    assert "job_1" in error["message"]
    assert "succeeded" in error["message"]
