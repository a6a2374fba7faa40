"""A job's per-epoch history, read from its epoch events."""

from collections.abc import Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.tables import JobEvent


def epoch_rows(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per global epoch, in order; a resumed job's repeated epoch keeps its last run."""
    by_epoch: dict[int, dict[str, Any]] = {}
    for data in events:
        by_epoch[int(data["global_epoch"])] = data
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def epoch_history(session: Session, *, job_id: str) -> list[dict[str, Any]]:
    events = session.scalars(
        select(JobEvent.data)
        .where(JobEvent.job_id == job_id, JobEvent.kind == "epoch")
        .order_by(JobEvent.id)
    )
    return epoch_rows(events)
