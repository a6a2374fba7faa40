"""A job's events as server-sent events: every stored event once, in order, then the end.

Events live in the database (the worker writes them), so the stream polls: one small query every
`POLL_SECONDS`. Each stored event goes out with `id:` (its row id, so a reconnecting client's
`Last-Event-ID` resumes after it), `event:` (its kind) and `data:` (the event as JSON). Between
them, `progress` events without an id carry `status`, `progress` and `eta_seconds` when they
change, and a comment line keeps idle connections from being closed by proxies.
"""

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
from sqlalchemy import select

from service.bounds import parse_cursor
from service.context import AppContext
from service.jobs.schemas import JobEventOut, estimate_eta
from service.jobs.states import TERMINAL_STATUSES
from service.tables import Job, JobEvent

POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0
RETRY_MILLISECONDS = 2000
BATCH = 500


@dataclass
class _Snapshot:
    status: str | None
    progress: float
    eta_seconds: float | None
    events: list[JobEventOut]


SSE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "One server-sent event: `id` (stored events), `event` and `data` (JSON).",
    "properties": {
        "id": {"type": "string"},
        "event": {"type": "string"},
        "data": {"type": "string"},
    },
}
"""The schema of each event of a `text/event-stream` answer, as OpenAPI tools read it."""


def resume_cursor(*, last_event_id: str | None, after: str | None) -> int:
    """Where to resume: the `Last-Event-ID` header wins over `?after=`; 0 means from the start."""
    value = last_event_id if last_event_id not in (None, "") else after
    if value is None or value == "":
        return 0
    # Checked here, before the stream's first byte: a cursor past the database's range would
    # otherwise fail its first query with the answer's 200 already sent.
    return parse_cursor(value, param="Last-Event-ID" if last_event_id else "after")


def _snapshot(context: AppContext, job_id: str, after: int) -> _Snapshot:
    with context.db.session() as session:
        # The job first: its terminal status and terminal event are committed together, so
        # once the job reads terminal, the events query below is sure to see that event.
        job = session.get(Job, job_id)
        rows = session.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.id > after)
            .order_by(JobEvent.id)
            .limit(BATCH)
        )
        events = [JobEventOut.model_validate(row) for row in rows]
        if job is None:
            return _Snapshot(status=None, progress=0.0, eta_seconds=None, events=events)
        eta = estimate_eta(status=job.status, progress=job.progress, started_at=job.started_at)
        return _Snapshot(status=job.status, progress=job.progress, eta_seconds=eta, events=events)


def format_sse(*, data: dict[str, Any], event: str, event_id: int | None = None) -> str:
    lines = [] if event_id is None else [f"id: {event_id}"]
    lines += [f"event: {event}", f"data: {json.dumps(data, separators=(',', ':'))}"]
    return "\n".join(lines) + "\n\n"


def is_terminal(event: JobEventOut) -> bool:
    return event.kind == "status" and event.data.get("status") in TERMINAL_STATUSES


async def job_event_stream(context: AppContext, *, job_id: str, after: int) -> AsyncIterator[str]:
    yield f"retry: {RETRY_MILLISECONDS}\n\n"
    last_sent = time.monotonic()
    last_progress: tuple[str, float] | None = None
    while True:
        snapshot = await anyio.to_thread.run_sync(_snapshot, context, job_id, after)
        for event in snapshot.events:
            yield format_sse(
                data=event.model_dump(mode="json"), event=event.kind, event_id=event.id
            )
            after = event.id
            if is_terminal(event):
                return
        if snapshot.status is None:  # the job was deleted under us
            return
        if snapshot.status in TERMINAL_STATUSES and not snapshot.events:
            # Resumed after the terminal event: the client has everything already.
            return
        if (snapshot.status, snapshot.progress) != last_progress:
            last_progress = (snapshot.status, snapshot.progress)
            yield format_sse(
                data={
                    "status": snapshot.status,
                    "progress": snapshot.progress,
                    "eta_seconds": snapshot.eta_seconds,
                },
                event="progress",
            )
            last_sent = time.monotonic()
        elif snapshot.events:
            last_sent = time.monotonic()
        elif time.monotonic() - last_sent >= KEEPALIVE_SECONDS:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        if len(snapshot.events) < BATCH:
            await anyio.sleep(POLL_SECONDS)
