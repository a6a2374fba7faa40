"""The services under thaw restart (issue 5, item 7): Redis loses every queued message, and
Postgres drops every connection while a job trains. The test restarts the machine's real servers
with the commands that started them, and always leaves them running."""

import contextlib
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from service.queues import CPU_QUEUE
from tests.reliability.conftest import Fleet

pytestmark = pytest.mark.reliability

# Postgres is down for a few seconds: a lease longer than that lets the running attempt carry
# on once its retried writes go through, instead of being replaced.
FLEET_ENV = {"THAW_LEASE_SECONDS": "30"}
POSTGRES_DOWN_SECONDS = 4

REDIS_START = [
    "redis-server",
    "--daemonize",
    "yes",
    "--bind",
    "127.0.0.1",
    "-::1",
    "--port",
    "6379",
    "--save",
    "",
    "--appendonly",
    "no",
    "--dir",
    "/var/lib/redis",
    "--logfile",
    "/var/log/redis/ci.log",
]


def postgres_cluster() -> list[str]:
    version = sorted(p.name for p in Path("/etc/postgresql").iterdir())[-1]
    return ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main"]


def restart_redis(url: str) -> None:
    """Stop Redis without saving (it keeps nothing on disk here) and start it again."""
    # The server closes the connection as it exits.
    with contextlib.suppress(redis.ConnectionError):
        redis.Redis.from_url(url).shutdown(nosave=True)
    subprocess.run(REDIS_START, check=True)
    wait_for_redis(url)


def wait_for_redis(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if redis.Redis.from_url(url).ping():
                return
        except redis.ConnectionError:
            time.sleep(0.2)
    pytest.fail("Redis did not come back")


def queued_messages(broker: "redis.Redis[bytes]") -> dict[str, str]:
    """The task messages waiting in the CPU queue: Celery's task id -> its arguments."""
    messages = [json.loads(raw) for raw in broker.lrange(CPU_QUEUE, 0, -1)]
    return {m["headers"]["id"]: m["headers"]["argsrepr"] for m in messages}


def test_redis_restart_loses_queued_jobs_that_postgres_re_enqueues(
    fleet: Fleet, digits: str
) -> None:
    jobs = [fleet.submit(digits, f"requeued-{n}", epochs=1) for n in range(2)]
    broker = fleet.broker()
    sent = queued_messages(broker)
    assert len(sent) == 2
    assert all(any(job_id in args for args in sent.values()) for job_id in jobs), sent
    try:
        restart_redis(fleet.redis_url)
    finally:
        if subprocess.run(["redis-cli", "ping"], capture_output=True).returncode != 0:
            subprocess.run(REDIS_START, check=True)
        wait_for_redis(fleet.redis_url)
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


def test_postgres_restart_while_a_job_trains(fleet: Fleet, digits: str) -> None:
    worker = fleet.start_worker()
    job_id = fleet.submit(digits, "steady", epochs=3)
    fleet.wait_until("the first epoch", lambda: bool(fleet.epochs(job_id)))
    try:
        # Down for seconds, not the fraction of a second a bare restart takes here, so the
        # worker's writes meet a refused connection rather than just a reconnect.
        subprocess.run([*postgres_cluster(), "stop", "--", "-m", "fast"], check=True)
        time.sleep(POSTGRES_DOWN_SECONDS)
    finally:
        subprocess.run([*postgres_cluster(), "start"], check=True)
    job = fleet.wait(job_id, {"succeeded", "failed", "cancelled"})
    assert job["status"] == "succeeded", job
    # The same attempt finished: its writes were retried, not lost with the connection.
    assert job["attempt"] == 1
    assert fleet.epochs(job_id) == [1, 2, 3]
    assert "database unreachable" in worker.text()
    assert len(fleet.versions("steady")) == 1
    worker.kill(signal.SIGTERM)
