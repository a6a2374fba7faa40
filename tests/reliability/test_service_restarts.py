"""The services under thaw restart (issue 5, item 7): Redis loses every queued message, and
Postgres drops every connection while a job trains. The module starts its own Redis server and
its own Postgres cluster (a temporary data folder, free ports) and restarts those, never the
servers other tests and sessions share."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from service.queues import CPU_QUEUE
from tests.conftest import service_absent
from tests.processes import free_port
from tests.reliability.conftest import Fleet, fleet_on

pytestmark = pytest.mark.reliability

# Postgres is down for a few seconds: a lease longer than that lets the running attempt carry
# on once its retried writes go through, instead of being replaced.
FLEET_ENV = {"THAW_LEASE_SECONDS": "30"}
POSTGRES_DOWN_SECONDS = 4


class OwnRedis:
    """A redis-server of this module's, on a free port, keeping nothing on disk."""

    def __init__(self, folder: Path) -> None:
        server = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.access(server, os.X_OK):
            service_absent("redis-server is not installed")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.command = [server, "--bind", "127.0.0.1", "--port", str(self.port)]
        self.command += ["--save", "", "--appendonly", "no", "--dir", str(folder)]
        self.command += ["--logfile", str(folder / "redis.log")]
        self.process: subprocess.Popen[bytes] | None = None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        self.process = subprocess.Popen(self.command)
        wait_for_redis(self.url)

    def restart(self) -> None:
        """Stop without saving (nothing is kept on disk) and start again."""
        # The server closes the connection as it exits.
        with contextlib.suppress(redis.ConnectionError):
            redis.Redis.from_url(self.url).shutdown(nosave=True)
        assert self.process is not None
        self.process.wait(timeout=30)
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.running():
            self.process.terminate()
            self.process.wait(timeout=30)


class OwnPostgres:
    """A Postgres cluster of this module's: initdb in a temporary folder, a free port, its
    socket in its own folder. Run as the `postgres` user when the tests run as root (initdb
    refuses root)."""

    def __init__(self) -> None:
        initdb = shutil.which("initdb") or next(
            iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)), None
        )
        if initdb is None:
            service_absent("PostgreSQL's initdb is not installed")
        bin_dir = Path(initdb).resolve().parent
        self.initdb, self.pg_ctl = str(bin_dir / "initdb"), str(bin_dir / "pg_ctl")
        self.as_owner: list[str] = []
        self.folder = Path(tempfile.mkdtemp(prefix="thaw-restarts-postgres-"))
        if os.geteuid() == 0:
            self.as_owner = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.folder, "postgres", "postgres")
        self.data = self.folder / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        subprocess.run([*self.as_owner, *args], check=True, capture_output=True)

    def create(self) -> None:
        # --no-sync: a throwaway cluster need not wait for the disk.
        self._run(self.initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.folder / "postgres.log")
        self._run(self.pg_ctl, "-D", str(self.data), "-l", log, "-o", options, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(self.pg_ctl, "-D", str(self.data), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        status = [*self.as_owner, self.pg_ctl, "-D", str(self.data), "status"]
        return subprocess.run(status, capture_output=True).returncode == 0

    def remove(self) -> None:
        if self.data.exists() and self.running():
            self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[OwnPostgres]:
    cluster = OwnPostgres()
    try:
        cluster.create()
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture(scope="module")
def fleet(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    own_postgres: OwnPostgres,
    own_redis: OwnRedis,
) -> Iterator[Fleet]:
    """This module's fleet, on its own Postgres cluster and Redis server."""
    with fleet_on(request, tmp_path_factory, own_postgres.url, own_redis.url) as fleet:
        yield fleet


def wait_for_redis(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if redis.Redis.from_url(url).ping():
                return
        except redis.ConnectionError:
            time.sleep(0.05)
    pytest.fail("Redis did not come back")


def queued_messages(broker: "redis.Redis[bytes]") -> dict[str, str]:
    """The task messages waiting in the CPU queue: Celery's task id -> its arguments."""
    messages = [json.loads(raw) for raw in broker.lrange(CPU_QUEUE, 0, -1)]
    return {m["headers"]["id"]: m["headers"]["argsrepr"] for m in messages}


def test_redis_restart_loses_queued_jobs_that_postgres_re_enqueues(
    fleet: Fleet, digits: str, own_redis: OwnRedis
) -> None:
    jobs = [fleet.submit(digits, f"requeued-{n}", epochs=1) for n in range(2)]
    broker = fleet.broker()
    sent = queued_messages(broker)
    assert len(sent) == 2
    assert all(any(job_id in args for args in sent.values()) for job_id in jobs), sent
    try:
        own_redis.restart()
    finally:
        if not own_redis.running():
            own_redis.start()
    # The restart lost both messages; the reaper (every half second) finds the broker empty
    # and sends new ones, one per job still queued in Postgres.
    assert not set(queued_messages(broker)) & set(sent), "the restart kept the messages"
    fleet.wait_until("the queue refilled from Postgres", lambda: broker.llen(CPU_QUEUE) == 2)
    resent = queued_messages(broker)
    assert not set(resent) & set(sent)
    assert sorted(resent.values()) == sorted(sent.values())
    fleet.start_worker()
    for job_id in jobs:
        job = fleet.wait(job_id, {"succeeded", "failed", "cancelled"})
        assert (job["status"], job["attempt"]) == ("succeeded", 1), job
        running = [s for s in fleet.statuses(job_id) if s["status"] == "running"]
        assert len(running) == 1, running
        assert len(fleet.versions(f"requeued-{jobs.index(job_id)}")) == 1
    assert broker.llen(CPU_QUEUE) == 0


def test_postgres_restart_while_a_job_trains(
    fleet: Fleet, digits: str, own_postgres: OwnPostgres
) -> None:
    worker = fleet.start_worker()
    job_id = fleet.submit(digits, "steady", epochs=3)
    fleet.wait_until("the first epoch", lambda: bool(fleet.epochs(job_id)))
    try:
        # Down for seconds, not the fraction of a second a bare restart takes here, so the
        # worker's writes meet a refused connection rather than just a reconnect.
        own_postgres.stop()
        time.sleep(POSTGRES_DOWN_SECONDS)
    finally:
        if not own_postgres.running():
            own_postgres.start()
    job = fleet.wait(job_id, {"succeeded", "failed", "cancelled"})
    assert job["status"] == "succeeded", job
    # The same attempt finished: its writes were retried, not lost with the connection.
    assert job["attempt"] == 1
    assert fleet.epochs(job_id) == [1, 2, 3]
    assert "database unreachable" in worker.text()
    assert len(fleet.versions("steady")) == 1
    worker.kill(signal.SIGTERM)
