"""A job's hooks into the engine's training: an event per epoch, the checkpoint to the store,
the lease renewed, and the stop when the job was cancelled, taken over, is past its deadline or
the worker must shut down.

Every database write retries while the database is unreachable (for up to a lease), so a
database restart pauses a job rather than failing it.
"""

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.context import AppContext
from service.db import utcnow
from service.jobs import transitions
from service.jobs.service import checkpoint_key, latest_checkpoint_key, record_event
from service.jobs.states import (
    LEASED_STATUSES,
    RESUMED,
    IllegalTransitionError,
    JobStatus,
)
from service.tables import Job
from worker import trials
from worker.engine import EpochResult, TrainingCancelled, TrainingHooks

logger = logging.getLogger(__name__)

LEASE_RENEWAL_SECONDS = 1.0
STATUS_POLL_SECONDS = 0.05
"""How stale a worker's view of its job's status may be: a cancel stops training at the first
step boundary after it; a few small reads a second cost nothing beside a training step."""

shutdown_requested = threading.Event()
"""Set when this worker process is asked to stop: the running job is handed back."""

T = TypeVar("T")


class DeadlineExceededError(Exception):
    pass


@dataclass(frozen=True)
class Claim:
    attempt: int
    deadline_at: datetime


def db(context: AppContext, operation: Callable[[Session], T]) -> T:
    """`operation` in a session, retried while the database is unreachable (up to a lease)."""
    return context.db.retrying(operation, for_seconds=context.settings.lease_seconds)


def _lease(context: AppContext) -> timedelta:
    return timedelta(seconds=context.settings.lease_seconds)


def claim(context: AppContext, *, job_id: str, owner: str) -> Claim:
    """Move a queued job to running and return its attempt; IllegalTransitionError if it is not
    queued (this delivery of its task is a duplicate)."""

    def claim_in(session: Session) -> Claim:
        job = transitions.claim(session, job_id=job_id, owner=owner, lease=_lease(context))
        session.commit()
        assert job.deadline_at is not None
        return Claim(attempt=job.attempt, deadline_at=job.deadline_at)

    return db(context, claim_in)


class JobHooks(TrainingHooks):
    """Writes an event per epoch and the job's progress; renews the lease; stops training when
    the job was cancelled, taken over, is past its deadline, or the worker must shut down."""

    def __init__(self, context: AppContext, *, job_id: str, claim: Claim) -> None:
        self.context = context
        self.job_id = job_id
        self.attempt = claim.attempt
        self.deadline_at = claim.deadline_at
        self.fraction_done = 0.0
        self.progress_span = (0.0, 1.0)
        """The share of the job's progress bar the current run fills (a refitting job runs
        twice), so that the fraction done only grows."""
        self._last_renewal = self._last_poll = time.monotonic()
        self._saved_checkpoint = False
        self._training = threading.Event()
        """Set by the first `should_stop`: from then on training renews the lease."""
        self._lost = threading.Event()

    def _event(self, kind: str, data: dict[str, Any]) -> None:
        def write(session: Session) -> None:
            # Fenced like every other write: an attempt that lost the job records nothing more.
            job = session.get_one(Job, self.job_id, with_for_update=True)
            if job.attempt == self.attempt and job.status in LEASED_STATUSES:
                record_event(session, job=job, kind=kind, data=data)
            session.commit()

        db(self.context, write)

    def on_epoch_end(self, result: EpochResult) -> None:
        self._event("epoch", dataclasses.asdict(result))
        trials.after_epoch(self.context, job_id=self.job_id)

    def on_checkpoint(self, path: Path) -> None:
        # The store, not this host, keeps the checkpoint: a job whose host dies resumes on any
        # other. An object appears whole or not at all, so a crash mid-upload leaves the last one.
        # Fenced twice: an attempt that lost the job uploads nothing, and each attempt writes
        # under its own key, so one that loses it during the upload cannot touch a newer one's.
        if not db(self.context, self._still_ours):
            logger.info("job %s attempt %d lost the job; checkpoint not saved", *self._who())
            return
        self.context.store.put_file(checkpoint_key(self.job_id, self.attempt), path)
        if not self._saved_checkpoint:
            self._saved_checkpoint = True
            # The one it resumed from (if any) is older than this attempt's: no longer needed.
            while (
                older := latest_checkpoint_key(
                    self.context.store, self.job_id, before_attempt=self.attempt
                )
            ) is not None:
                self.context.store.delete(older)

    def _who(self) -> tuple[str, int]:
        return self.job_id, self.attempt

    @contextmanager
    def renewing_lease(self) -> Iterator[None]:
        """Keep the lease from the claim until training renews it between steps (its first
        `should_stop`): the dataset, the checkpoint and a parent model come down from the store
        first and may take longer than a lease. A thread renews it meanwhile; once a renewal
        finds the job no longer this attempt's, `check_still_ours` and `should_stop` say so."""
        renewer = threading.Thread(
            target=self._renew_until_training, name=f"lease-{self.job_id}", daemon=True
        )
        renewer.start()
        try:
            yield
        finally:
            self._training.set()
            renewer.join()

    def _renew_until_training(self) -> None:
        while not self._training.wait(LEASE_RENEWAL_SECONDS):
            try:
                if not db(self.context, self._renew):
                    self._lost.set()
                    return
            except Exception:
                # The next renewal tries again; a lease is many renewals long.
                logger.exception("job %s attempt %d: lease renewal failed", *self._who())

    def check_still_ours(self) -> None:
        """TrainingCancelled if the job was cancelled or taken over during setup."""
        if self._lost.is_set():
            raise TrainingCancelled()

    def on_resume(self, completed_epochs: int, steps_into_epoch: int) -> None:
        self._event(
            "status",
            {
                "status": RESUMED,
                "completed_epochs": completed_epochs,
                "steps_into_epoch": steps_into_epoch,
            },
        )

    def on_progress(self, done_steps: int, total_steps: int) -> None:
        start, end = self.progress_span
        share = min(done_steps / max(total_steps, 1), 1.0)
        # The span's end exactly when its run is done: start + (end - start) may round below.
        self.fraction_done = end if share == 1.0 else start + (end - start) * share

    def should_pause(self) -> bool:
        return shutdown_requested.is_set()

    def should_stop(self) -> bool:
        self._training.set()
        if self._lost.is_set():
            return True
        if utcnow() >= self.deadline_at:
            raise DeadlineExceededError()
        now = time.monotonic()
        if now - self._last_renewal >= LEASE_RENEWAL_SECONDS:
            self._last_renewal = self._last_poll = now
            return not db(self.context, self._renew)
        if now - self._last_poll >= STATUS_POLL_SECONDS:
            self._last_poll = now
            return not db(self.context, self._still_ours)
        return False

    def _renew(self, session: Session) -> bool:
        """Whether the job is still this attempt's to run (cancelled or taken over if not)."""
        try:
            transitions.renew(
                session,
                job_id=self.job_id,
                attempt=self.attempt,
                lease=_lease(self.context),
                progress=round(self.fraction_done, 4),
            )
        except IllegalTransitionError:
            return False
        session.commit()
        return True

    def _still_ours(self, session: Session) -> bool:
        row = session.execute(
            select(Job.status, Job.attempt).where(Job.id == self.job_id)
        ).one_or_none()
        return row is not None and tuple(row) == (JobStatus.RUNNING, self.attempt)
