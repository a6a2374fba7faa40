"""Ingest holds a lease, as a running job does (`service/jobs/transitions.py`), so a dataset
whose worker died mid-ingest goes back to the queue instead of staying `processing` for good.

- `claim`: a `processing` dataset no worker holds becomes a new attempt's, until now + the lease;
- `IngestLease`: the holding worker renews it from a thread while it ingests;
- `expire`: the reaper frees a dataset whose lease expired (another delivery claims it), or
  fails it with `worker_lost` once `THAW_MAX_WORKER_LOSSES` workers vanished holding it.

Each write is one conditional UPDATE fenced by the attempt: one that lost the dataset (its
lease expired and a later attempt claimed it) writes nothing. Ingest is deterministic (the same
archive and seed give the same files), so an attempt that finishes after its lease expired but
before another claimed the dataset may still record the result.
"""

import logging
import threading
from datetime import datetime, timedelta
from types import TracebackType

from sqlalchemy import ColumnElement, update
from sqlalchemy.orm import Session

from service.context import AppContext
from service.db import utcnow
from service.tables import Dataset

logger = logging.getLogger(__name__)

PROCESSING = "processing"


class IngestLostError(Exception):
    """This attempt no longer holds the dataset: another attempt ingests it."""


def claim(session: Session, *, dataset_id: str, owner: str, lease: timedelta) -> int | None:
    """The new attempt's number, or None when the dataset is not waiting for a worker (ingested
    already, or held by a live one: this delivery is a duplicate)."""
    attempt = session.scalars(
        update(Dataset)
        .where(
            Dataset.id == dataset_id,
            Dataset.status == PROCESSING,
            Dataset.lease_owner.is_(None),
        )
        .values(
            attempt=Dataset.attempt + 1,
            lease_owner=owner,
            lease_expires_at=utcnow() + lease,
        )
        .returning(Dataset.attempt)
    ).one_or_none()
    session.commit()
    return attempt


def holds(dataset_id: str, attempt: int) -> tuple[ColumnElement[bool], ...]:
    """The conditions under which `attempt` may still write the dataset's ingest."""
    return (Dataset.id == dataset_id, Dataset.status == PROCESSING, Dataset.attempt == attempt)


def renew(session: Session, *, dataset_id: str, attempt: int, lease: timedelta) -> bool:
    """Extend `attempt`'s lease; False once the dataset is no longer its to ingest."""
    extended = session.execute(
        update(Dataset)
        .where(*holds(dataset_id, attempt), Dataset.lease_owner.is_not(None))
        .values(lease_expires_at=utcnow() + lease)
    )
    session.commit()
    return bool(extended.rowcount)  # type: ignore[attr-defined]


def expire(
    session: Session, *, dataset: Dataset, max_worker_losses: int, now: datetime
) -> str | None:
    """The worker holding `dataset` (as the reaper read it) is gone: its lease expired before
    `now`. Returns `processing` when the dataset waits for another delivery, `failed` when it
    failed, None when it changed since it was read (its worker renewed, or it ended)."""
    losses = dataset.worker_losses + 1
    values: dict[str, object]
    if losses >= max_worker_losses:
        values = {
            "status": "failed",
            "progress": 1.0,
            "error_code": "worker_lost",
            "error_message": f"The worker ingesting this dataset vanished {losses} times; "
            "the upload may be crashing it (out of memory?): split it into smaller uploads.",
        }
    else:
        values = {"progress": 0.0}
    changed = session.execute(
        update(Dataset)
        .where(*holds(dataset.id, dataset.attempt), Dataset.lease_expires_at < now)
        .values(worker_losses=losses, lease_owner=None, lease_expires_at=None, **values)
    )
    if not changed.rowcount:  # type: ignore[attr-defined]
        return None
    return str(values.get("status", PROCESSING))


class IngestLease:
    """Renews `attempt`'s lease on the dataset from a thread for the block's duration.
    `check()` raises IngestLostError once a renewal found the dataset no longer its own."""

    def __init__(self, context: AppContext, *, dataset_id: str, attempt: int) -> None:
        self.context = context
        self.dataset_id = dataset_id
        self.attempt = attempt
        self.lease = timedelta(seconds=context.settings.lease_seconds)
        # A lease is several renewals long, so one slow write does not lose it.
        self.every = min(1.0, context.settings.lease_seconds / 4)
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{dataset_id}", daemon=True)

    def __enter__(self) -> "IngestLease":
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()

    def check(self) -> None:
        if self._lost.is_set():
            raise IngestLostError(self.dataset_id)

    def _renew(self) -> None:
        while not self._stop.wait(self.every):
            try:
                with self.context.db.session() as session:
                    held = renew(
                        session,
                        dataset_id=self.dataset_id,
                        attempt=self.attempt,
                        lease=self.lease,
                    )
            except Exception:
                logger.exception("dataset %s: lease renewal failed", self.dataset_id)
                continue
            if not held:
                logger.warning(
                    "dataset %s attempt %d lost its lease; another attempt ingests it",
                    self.dataset_id,
                    self.attempt,
                )
                self._lost.set()
                return
