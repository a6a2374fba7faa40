"""`GET /v1/jobs/{id}/events/stream`: server-sent events, live, resumable, ending at the end."""

import json
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
from fastapi.testclient import TestClient

from service.context import AppContext
from service.jobs import stream
from service.jobs.schemas import estimate_eta
from tests.conftest import new_key
from tests.test_api import assert_error, ready_dataset, small_spec
from worker import jobs


def parse_sse(text: str) -> list[dict[str, Any]]:
    """Messages as {"id", "event", "data"}; comments as {"comment"}; the `retry:` line skipped."""
    messages: list[dict[str, Any]] = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        message: dict[str, Any] = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                message["comment"] = line[1:].strip()
            else:
                field, _, value = line.partition(": ")
                message[field] = value
        if "data" in message:
            message["data"] = json.loads(message["data"])
        if set(message) != {"retry"}:
            messages.append(message)
    return messages


def test_stream_follows_a_job_to_its_end_and_resumes(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    dataset_id = ready_dataset(client, context, auth, classes=2, per_class=10)
    job = client.post("/v1/jobs", headers=auth, json=small_spec(dataset_id)).json()
    worker = threading.Thread(target=jobs.execute, args=(context,), kwargs={"job_id": job["id"]})

    async def follow() -> list[str]:
        chunks: list[str] = []
        async for chunk in stream.job_event_stream(context, job_id=job["id"], after=0):
            chunks.append(chunk)
            if chunk.startswith("event: progress") and worker.ident is None:
                # The stream has shown the job queued and is waiting on it: only now does the
                # worker start, so everything after this the stream must see live.
                assert '"status":"queued"' in chunk, chunk
                worker.start()
        return chunks

    live = parse_sse("".join(anyio.run(follow)))
    worker.join()
    response = client.get(f"/v1/jobs/{job['id']}/events/stream", headers=auth)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.startswith("retry: ")
    messages = parse_sse(response.text)
    replayed = [m for m in messages if "id" in m]
    assert replayed == [m for m in live if "id" in m], "the replay is what the live stream sent"
    messages = live

    stored = [m for m in messages if "id" in m]
    assert [m["event"] for m in stored] == ["status", "status", "epoch", "epoch", "status"]
    assert [m["data"]["data"].get("status") for m in stored if m["event"] == "status"] == [
        "queued",
        "running",
        "succeeded",
    ]
    ids = [int(m["id"]) for m in stored]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(int(m["id"]) == m["data"]["id"] for m in stored)
    epoch = stored[2]["data"]["data"]
    assert {"stage", "global_epoch", "train_loss", "val_loss", "val_accuracy"} <= set(epoch)
    assert messages[-1] == stored[-1], "nothing follows the terminal event"
    progress = [m for m in messages if m.get("event") == "progress"]
    assert progress
    assert progress[0]["data"]["status"] == "queued"
    assert set(progress[0]["data"]) == {"status", "progress", "eta_seconds"}

    listed = client.get(f"/v1/jobs/{job['id']}/events", headers=auth).json()["data"]
    assert [e["id"] for e in listed] == ids

    # Resuming: after the second event (header or query), and after the very end.
    second = str(ids[1])
    by_header = client.get(
        f"/v1/jobs/{job['id']}/events/stream", headers={**auth, "Last-Event-ID": second}
    )
    by_query = client.get(f"/v1/jobs/{job['id']}/events/stream?after={second}", headers=auth)
    for resumed in (by_header, by_query):
        assert [int(m["id"]) for m in parse_sse(resumed.text) if "id" in m] == ids[2:]
    finished = client.get(
        f"/v1/jobs/{job['id']}/events/stream", headers={**auth, "Last-Event-ID": str(ids[-1])}
    )
    assert parse_sse(finished.text) == []

    shown = client.get(f"/v1/jobs/{job['id']}", headers=auth).json()
    assert shown["status"] == "succeeded"
    assert shown["eta_seconds"] == 0.0


def test_stream_is_tenant_scoped_and_validates_the_cursor(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    dataset_id = ready_dataset(client, context, auth, classes=2, per_class=6)
    job = client.post("/v1/jobs", headers=auth, json=small_spec(dataset_id)).json()
    other = new_key(context, "team-b")
    assert_error(
        client.get(f"/v1/jobs/{job['id']}/events/stream", headers=other), 404, "job_not_found"
    )
    assert_error(
        client.get(f"/v1/jobs/{job['id']}/events/stream?after=x", headers=auth),
        422,
        "invalid_request",
        "after",
    )
    assert_error(
        client.get(
            f"/v1/jobs/{job['id']}/events/stream", headers={**auth, "Last-Event-ID": "nope"}
        ),
        422,
        "invalid_request",
        "Last-Event-ID",
    )
    # Cursors past the database's 64-bit range, on the job's and an experiment's events and
    # streams: a 422 before the stream's first byte (they were a 500, or a 200 cut short).
    experiment = client.post(
        "/v1/experiments",
        headers=auth,
        json={
            "dataset": dataset_id,
            "model": "cursor",
            "base_models": ["efficientnet_lite0"],
            "strategies": ["fine_tune"],
        },
    )
    assert experiment.status_code == 201, experiment.text
    huge, negative = "9" * 40, "-" + "9" * 40
    for base in (f"/v1/jobs/{job['id']}", f"/v1/experiments/{experiment.json()['id']}"):
        for cursor in (huge, negative, str(2**63)):
            for path in (f"{base}/events?after={cursor}", f"{base}/events/stream?after={cursor}"):
                assert_error(client.get(path, headers=auth), 422, "invalid_request", "after")
        assert_error(
            client.get(f"{base}/events/stream", headers={**auth, "Last-Event-ID": str(2**63)}),
            422,
            "invalid_request",
            "Last-Event-ID",
        )
        last = client.get(f"{base}/events?after={2**63 - 1}", headers=auth)
        assert last.status_code == 200
        assert last.json()["data"] == []


def test_idle_stream_sends_keepalives_and_ends_on_cancel(
    client: TestClient, context: AppContext, auth: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stream, "POLL_SECONDS", 0.05)
    monkeypatch.setattr(stream, "KEEPALIVE_SECONDS", 0.1)
    dataset_id = ready_dataset(client, context, auth, classes=2, per_class=6)
    job = client.post("/v1/jobs", headers=auth, json=small_spec(dataset_id)).json()

    async def read() -> list[str]:
        chunks: list[str] = []
        async for chunk in stream.job_event_stream(context, job_id=job["id"], after=0):
            chunks.append(chunk)
            if chunks.count(": keep-alive\n\n") == 2:
                # The job sits queued (no worker): nothing but keep-alives until it is cancelled.
                await anyio.to_thread.run_sync(
                    lambda: client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
                )
        return chunks

    chunks = anyio.run(read)
    messages = parse_sse("".join(chunks))
    assert [m["comment"] for m in messages if "comment" in m] == ["keep-alive", "keep-alive"]
    assert messages[-1]["event"] == "status"
    assert messages[-1]["data"]["data"]["status"] == "cancelled"


def test_eta_estimate() -> None:
    now = datetime(2025, 1, 1, 12, 0, 30, tzinfo=UTC)
    started = now - timedelta(seconds=30)
    assert estimate_eta(status="running", progress=0.25, started_at=started, now=now) == 90.0
    assert estimate_eta(status="running", progress=0.0, started_at=started, now=now) is None
    assert estimate_eta(status="queued", progress=0.0, started_at=None, now=now) is None
    assert estimate_eta(status="failed", progress=0.5, started_at=started, now=now) is None
    assert estimate_eta(status="succeeded", progress=1.0, started_at=started, now=now) == 0.0
