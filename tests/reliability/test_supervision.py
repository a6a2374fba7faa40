"""`thaw serve` supervises its workers: `kill -9` of the dataset worker mid-ingest and of the
training worker mid-job, and both the dataset and the job finish without restarting `thaw
serve`, within a lease and a restart; `/readyz` reports each gap while it lasts and
`/metrics` counts the restarts, whichever API process answers.

On the embedded default (SQLite, folder broker), with a short lease and a fast reaper so the
faults are noticed in seconds."""

import os
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import digits_split, zip_of_classes
from tests.processes import THAW, create_key, free_port, poll, running, thaw_env, wait_ready

pytestmark = pytest.mark.reliability

LEASE_SECONDS = 4
EPOCHS = 3
SPEC = {
    "model": "supervised",
    "base_model": "efficientnet_lite0",
    "strategy": "fine_tune",
    "epochs": EPOCHS,
    "batch_size": 16,
    "lr": 0.01,
    "image_size": 64,
    "seed": 5,
    # One run: these tests count its steps (a small set refits by default, a second run).
    "refit": False,
}
"""Six steps an epoch on 96 training digits: the kill lands after epoch 1, before the last."""


def worker_pid(parent: int, name: str) -> int:
    """The pid of `parent`'s worker process named `name`: `--hostname name@host` in its
    command line, or in the title Celery gives its process (`[celeryd: name@host:...]`)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            arguments = (entry / "cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue  # exited meanwhile
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and any(f"{name}@" in argument for argument in arguments):
            return int(entry.name)
    pytest.fail(f"no {name} worker under pid {parent}")


def wait_until(what: str, check: Callable[[], Any], timeout: float, log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout}s waiting for {what}:\n{log.read_text()[-3000:]}")


def stranded(base: str) -> set[str]:
    """The queues `/readyz` says have work and no live worker."""
    answer = httpx.get(f"{base}/readyz", timeout=5)
    workers = str(answer.json()["checks"].get("workers", ""))
    if answer.status_code == 200:
        assert workers == "ok"
        return set()
    assert answer.status_code == 503, answer.text
    return set(workers.removeprefix("no live worker for ").split(", "))


@pytest.mark.timeout(900)
def test_serve_restarts_killed_workers_and_their_work_finishes(tmp_path: Path) -> None:
    env = thaw_env(
        tmp_path / "data",
        THAW_LEASE_SECONDS=str(LEASE_SECONDS),
        THAW_REAPER_INTERVAL_SECONDS="0.5",
        # A lease this short may expire under load without a kill: such a loss is retried.
        THAW_MAX_WORKER_LOSSES="10",
        THAW_API_PROCESSES="2",
        THAW_TORCH_THREADS="1",
        THAW_ONNX_EXPORT="false",
    )
    headers = create_key(env, "supervised")
    database = sqlite3.connect(tmp_path / "data" / "thaw.db", timeout=10)
    pool, _ = digits_split()
    small = [item for label in range(10) for item in [i for i in pool if i[1] == label][:12]]
    large = zip_of_classes(pool)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with (
        running([*THAW, "serve", "--port", str(port)], env, log) as server,
        httpx.Client(base_url=base, headers=headers, timeout=300) as client,
    ):
        wait_ready(base, server, log, timeout=300)
        upload = client.post("/v1/datasets", files={"file": ("d.zip", zip_of_classes(small))})
        assert upload.status_code == 202, upload.text
        dataset = poll(client, f"/v1/datasets/{upload.json()['id']}", {"ready", "failed"}, 60)
        assert dataset["status"] == "ready", dataset
        created = client.post("/v1/jobs", json={**SPEC, "dataset": dataset["id"]})
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]

        # The dataset worker, killed mid-ingest: once it holds the lease and reported progress.
        upload = client.post("/v1/datasets", files={"file": ("all.zip", large)})
        assert upload.status_code == 202, upload.text
        large_id = upload.json()["id"]

        def ingesting() -> bool:
            row = database.execute(
                "SELECT status, lease_owner, progress FROM datasets WHERE id = ?", (large_id,)
            ).fetchone()
            return bool(row[0] == "processing" and row[1] and 0 < row[2] < 1)

        wait_until("the large dataset mid-ingest", ingesting, 120, log)
        ingest_worker = worker_pid(server.pid, "datasets")
        os.kill(ingest_worker, signal.SIGKILL)
        assert client.get(f"/v1/datasets/{large_id}").json()["status"] == "processing"
        wait_until(
            "/readyz to report the dataset worker's gap",
            lambda: "datasets" in stranded(base),
            30,
            log,
        )

        # The training worker, killed mid-job: after epoch 1 (its checkpoint is stored).
        def epochs() -> list[int]:
            events = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 200}).json()
            return [e["data"]["global_epoch"] for e in events["data"] if e["kind"] == "epoch"]

        wait_until("epoch 1", epochs, 180, log)
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
        training_worker = worker_pid(server.pid, "train")
        os.kill(training_worker, signal.SIGKILL)
        wait_until(
            "/readyz to report the training worker's gap", lambda: "cpu" in stranded(base), 30, log
        )

        # Restarted: both queues have a live worker again, in new processes.
        wait_until("/readyz ready again", lambda: not stranded(base), 90, log)
        assert worker_pid(server.pid, "datasets") != ingest_worker
        assert worker_pid(server.pid, "train") != training_worker

        large_dataset = poll(client, f"/v1/datasets/{large_id}", {"ready", "failed"}, 120)
        assert large_dataset["status"] == "ready", large_dataset
        assert large_dataset["num_images"] == len(pool)
        attempt, owner = database.execute(
            "SELECT attempt, lease_owner FROM datasets WHERE id = ?", (large_id,)
        ).fetchone()
        assert (attempt, owner) == (2, None)

        job = poll(client, f"/v1/jobs/{job_id}", {"succeeded", "failed", "cancelled"}, 180)
        assert job["status"] == "succeeded", job
        assert job["attempt"] >= 2
        assert epochs() == list(range(1, EPOCHS + 1))
        statuses = [
            e["data"]
            for e in client.get(f"/v1/jobs/{job_id}/events", params={"limit": 200}).json()["data"]
            if e["kind"] == "status"
        ]
        assert {"status": "queued", "reason": "lease_expired"} in statuses
        assert any(s["status"] == "resumed" and s["completed_epochs"] >= 1 for s in statuses)

        # Either API process answers the scrape with the supervisor's counts.
        for _ in range(4):
            scraped = httpx.get(f"{base}/metrics", timeout=10).text
            assert 'thaw_worker_restarts_total{worker="datasets"} 1.0' in scraped
            assert 'thaw_worker_restarts_total{worker="train"} 1.0' in scraped
    database.close()
    text = log.read_text()
    assert f"worker datasets (pid {ingest_worker}) was killed by SIGKILL; restarting" in text
    assert f"worker train (pid {training_worker}) was killed by SIGKILL; restarting" in text
