"""A fleet of real processes for the fault tests, as docker-compose.yml runs them but for the
API, which runs as one uvicorn process so a test can kill it outright (its reaper does the
recovery); Celery workers started and killed by the tests, a fresh Postgres database per test
module, and Redis.

Timings are shortened so faults are noticed in seconds: leases of a few seconds, the reaper
every half second. Workers use one torch thread so two of them share the machine's cores."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import digits_split, fresh_postgres_database, zip_of_classes
from tests.processes import THAW, create_key, free_port, poll, running, thaw_env, wait_ready

LEASE_SECONDS = 6
MAX_WORKER_LOSSES = 2
TRAIN_IMAGES_PER_CLASS = 24
SPEC: dict[str, Any] = {
    "base_model": "efficientnet_lite0",
    "strategy": "fine_tune",
    "batch_size": 16,
    "lr": 0.01,
    "image_size": 64,
    "seed": 3,
    # One run: these tests count its steps (a small set refits by default, a second run).
    "refit": False,
}
"""About 0.2 s a step and 12 steps an epoch here: a kill can land inside an epoch."""


class Fleet:
    def __init__(
        self,
        root: Path,
        database_url: str,
        redis_url: str,
        stack: ExitStack,
        overrides: dict[str, str],
    ) -> None:
        self.root = root
        self.redis_url = redis_url
        self.stack = stack
        self.env = thaw_env(
            root / "data",
            THAW_DATABASE_URL=database_url,
            THAW_BROKER_URL=redis_url,
            THAW_TORCH_THREADS="1",
            THAW_LEASE_SECONDS=str(LEASE_SECONDS),
            THAW_MAX_WORKER_LOSSES=str(MAX_WORKER_LOSSES),
            THAW_REAPER_INTERVAL_SECONDS="0.5",
            THAW_ONNX_EXPORT="false",
        )
        self.env.update(overrides)
        self.storage = root / "data" / "artifacts"
        self.workers: list[Worker] = []
        self.api: subprocess.Popen[bytes] | None = None
        self.api_log = root / "api.log"
        subprocess.run([*THAW, "migrate"], env=self.env, check=True)
        self.headers = create_key(self.env, "reliability")
        self.base = f"http://127.0.0.1:{free_port()}"
        self.client = stack.enter_context(
            httpx.Client(base_url=self.base, headers=self.headers, timeout=60)
        )

    def start_api(self) -> None:
        port = self.base.rsplit(":", 1)[1]
        command = [sys.executable, "-m", "uvicorn", "--factory", "service.main:create_app"]
        command += ["--host", "127.0.0.1", "--port", port]
        self.api = self.stack.enter_context(running(command, self.env, self.api_log))
        wait_ready(self.base, self.api, self.api_log)

    def start_worker(self, queues: str = "cpu") -> "Worker":
        worker = self.launch_worker(queues)
        worker.wait_ready()
        return worker

    def start_workers(self, count: int, queues: str = "cpu") -> list["Worker"]:
        """`count` workers started together: their imports overlap instead of queueing."""
        workers = [self.launch_worker(queues) for _ in range(count)]
        for worker in workers:
            worker.wait_ready()
        return workers

    def launch_worker(self, queues: str = "cpu") -> "Worker":
        """A worker process, not yet ready: a test may go on while it imports, and then
        `wait_ready` on it."""
        name = f"w{len(self.workers) + 1}"
        log = self.root / f"{name}.log"
        command = [*THAW, "worker", "--queues", queues, "--name", name]
        process = self.stack.enter_context(running(command, self.env, log, signal.SIGTERM))
        worker = Worker(name=name, process=process, log=log)
        self.workers.append(worker)
        return worker

    def stop_workers(self) -> None:
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.kill()
                worker.wait_exit()

    def upload_digits(self) -> str:
        pool, _ = digits_split()
        seen: dict[int, int] = {}
        chosen = []
        for image, label in pool:
            if seen.get(label, 0) < TRAIN_IMAGES_PER_CLASS:
                seen[label] = seen.get(label, 0) + 1
                chosen.append((image, label))
        upload = self.client.post(
            "/v1/datasets", files={"file": ("digits.zip", zip_of_classes(chosen))}
        )
        assert upload.status_code == 202, upload.text
        dataset = poll(self.client, f"/v1/datasets/{upload.json()['id']}", {"ready", "failed"}, 120)
        assert dataset["status"] == "ready", dataset
        return str(dataset["id"])

    def submit(self, dataset_id: str, model: str, **spec: Any) -> str:
        created = self.client.post(
            "/v1/jobs", json={**SPEC, "dataset": dataset_id, "model": model, **spec}
        )
        assert created.status_code == 201, created.text
        return str(created.json()["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        body: dict[str, Any] = self.client.get(f"/v1/jobs/{job_id}").raise_for_status().json()
        return body

    def wait(self, job_id: str, statuses: set[str], timeout: float = 300) -> dict[str, Any]:
        return poll(self.client, f"/v1/jobs/{job_id}", statuses, timeout)

    def wait_until(self, what: str, check: Any, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.2)
        pytest.fail(f"timed out after {timeout}s waiting for {what}")

    def events(self, job_id: str) -> list[dict[str, Any]]:
        page = self.client.get(f"/v1/jobs/{job_id}/events", params={"limit": 200})
        data: list[dict[str, Any]] = page.raise_for_status().json()["data"]
        return data

    def statuses(self, job_id: str) -> list[dict[str, Any]]:
        return [e["data"] for e in self.events(job_id) if e["kind"] == "status"]

    def epochs(self, job_id: str) -> list[int]:
        return [e["data"]["global_epoch"] for e in self.events(job_id) if e["kind"] == "epoch"]

    def stored(self, prefix: str) -> list[str]:
        """Every file under a storage prefix, relative to it."""
        folder = self.storage / prefix
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())

    def versions(self, model: str) -> list[dict[str, Any]]:
        answer = self.client.get(f"/v1/models/{model}/versions")
        if answer.status_code == 404:
            return []
        data: list[dict[str, Any]] = answer.raise_for_status().json()["data"]
        return data

    def broker(self) -> "redis.Redis[bytes]":
        return redis.Redis.from_url(self.redis_url)


class Worker:
    def __init__(self, *, name: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.process = process
        self.log = log

    @property
    def identity(self) -> str:
        """How the worker names itself as a job's lease owner (host:pid)."""
        return f"{os.uname().nodename}:{self.process.pid}"

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"worker {self.name} exited early:\n{self.text()[-3000:]}")
            if " ready." in self.text():
                return
            time.sleep(0.2)
        pytest.fail(f"worker {self.name} not ready after {timeout}s:\n{self.text()[-3000:]}")

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        self.process.send_signal(sig)

    def wait_exit(self, timeout: float = 60) -> int:
        return self.process.wait(timeout=timeout)


@contextmanager
def fleet_on(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    database_url: str,
    redis_url: str,
) -> Iterator[Fleet]:
    """A fleet on the given (empty) database and Redis, its API started; a module may change
    settings with `FLEET_ENV`."""
    overrides: dict[str, str] = getattr(request.module, "FLEET_ENV", {})
    with ExitStack() as stack:
        redis.Redis.from_url(redis_url).flushdb()
        root = tmp_path_factory.mktemp("fleet")
        fleet = Fleet(root, database_url, redis_url, stack, overrides)
        fleet.start_api()
        yield fleet


@pytest.fixture(scope="module")
def fleet(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, redis_url: str
) -> Iterator[Fleet]:
    """One fleet per test module, on a fresh database of the test Postgres."""
    with (
        fresh_postgres_database() as database_url,
        fleet_on(request, tmp_path_factory, database_url, redis_url) as fleet,
    ):
        yield fleet


@pytest.fixture(scope="module")
def digits(fleet: Fleet) -> str:
    """A ready dataset of 240 digits; the worker that ingested it is stopped again."""
    worker = fleet.start_worker("datasets")
    dataset_id = fleet.upload_digits()
    worker.kill(signal.SIGTERM)
    worker.wait_exit()
    return dataset_id


ACTIVE_STATUSES = {"queued", "waiting_for_worker", "running", "cancelling"}


@pytest.fixture(autouse=True)
def no_active_jobs_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test ends its jobs. One that leaves a job active fails (a bug may have left it
    running); its workers are stopped and its jobs cancelled first, so that the next test's
    workers find no work that is not theirs."""
    yield
    if "fleet" not in request.fixturenames:
        return
    fleet: Fleet = request.getfixturevalue("fleet")
    fleet.stop_workers()
    jobs = fleet.client.get("/v1/jobs", params={"limit": 200}).json()["data"]
    left = [f"{job['id']} ({job['status']})" for job in jobs if job["status"] in ACTIVE_STATUSES]
    for job in jobs:
        if job["status"] in {"queued", "waiting_for_worker", "running"}:
            fleet.client.post(f"/v1/jobs/{job['id']}/cancel")
    if left:
        pytest.fail(f"the test left jobs active: {', '.join(left)}")
