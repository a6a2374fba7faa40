"""An experiment's events as server-sent events, as a job's are (`service/jobs/stream.py`): each
stored event once with its id, between them `progress` events (no id) with the count of trials
per status when it changes, and keep-alive comments; the stream ends after the experiment's
terminal status event."""

import time
from collections.abc import AsyncIterator

import anyio
from sqlalchemy import select

from service.context import AppContext
from service.experiments.schemas import ExperimentEventOut
from service.experiments.service import trial_counts
from service.jobs.states import EXPERIMENT_ENDED
from service.jobs.stream import (
    BATCH,
    KEEPALIVE_SECONDS,
    POLL_SECONDS,
    RETRY_MILLISECONDS,
    format_sse,
)
from service.tables import Experiment, ExperimentEvent


def _snapshot(
    context: AppContext, experiment_id: str, after: int
) -> tuple[str | None, dict[str, int], list[ExperimentEventOut]]:
    with context.db.session() as session:
        experiment = session.get(Experiment, experiment_id)
        rows = session.scalars(
            select(ExperimentEvent)
            .where(ExperimentEvent.experiment_id == experiment_id, ExperimentEvent.id > after)
            .order_by(ExperimentEvent.id)
            .limit(BATCH)
        )
        events = [ExperimentEventOut.model_validate(row) for row in rows]
        if experiment is None:
            return None, {}, events
        return experiment.status, trial_counts(session, experiment=experiment), events


async def experiment_event_stream(
    context: AppContext, *, experiment_id: str, after: int
) -> AsyncIterator[str]:
    yield f"retry: {RETRY_MILLISECONDS}\n\n"
    last_sent = time.monotonic()
    last_counts: dict[str, int] | None = None
    while True:
        status, counts, events = await anyio.to_thread.run_sync(
            _snapshot, context, experiment_id, after
        )
        for event in events:
            yield format_sse(
                data=event.model_dump(mode="json"), event=event.kind, event_id=event.id
            )
            after = event.id
            if event.kind == "status" and event.data.get("status") in EXPERIMENT_ENDED:
                return
        if status is None or (status in EXPERIMENT_ENDED and not events):
            return
        if counts != last_counts:
            last_counts = counts
            yield format_sse(data={"status": status, "trials": counts}, event="progress")
            last_sent = time.monotonic()
        elif events:
            last_sent = time.monotonic()
        elif time.monotonic() - last_sent >= KEEPALIVE_SECONDS:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        if len(events) < BATCH:
            await anyio.sleep(POLL_SECONDS)
