"""Jobs survive their workers' faults (issue 5, items 2-6 and 8): each test does the bad thing for
real to real worker processes (SIGKILL, SIGTERM, a duplicate task message, a crash in the middle
of publishing) on Postgres and Redis, and checks what the registry and the storage hold after."""

import hashlib
import re
import signal
import time
from functools import partial
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import make_url

from service.queues import CPU_QUEUE, TRAIN_TASK, create_celery
from tests.reliability.conftest import LEASE_SECONDS, MAX_WORKER_LOSSES, Fleet

pytestmark = pytest.mark.reliability

HELD_QUEUE = f"{CPU_QUEUE}-held"
"""Where the duplicate-delivery test keeps the task messages while its workers start."""
STEPS_PER_EPOCH = 12
"""The fleet's digits: 192 training images (80%) in batches of 16."""


def wait_for_step(fleet: Fleet, job_id: str, step: int) -> dict[str, Any]:
    """Wait until the job's recorded progress passed `step` training steps."""
    total = fleet.job(job_id)["plan"]["stages"][0]["epochs"] * STEPS_PER_EPOCH

    def passed() -> bool:
        return bool(fleet.job(job_id)["progress"] * total >= step)

    fleet.wait_until(f"job {job_id} past step {step}", passed)
    return fleet.job(job_id)


def seconds_per_step(fleet: Fleet, job_id: str) -> float:
    """This machine's step time now, from the job's progress as it moves: timeouts that wait
    on training scale with it instead of assuming a quiet machine."""
    total = fleet.job(job_id)["plan"]["stages"][0]["epochs"] * STEPS_PER_EPOCH
    first = fleet.job(job_id)["progress"]
    started = time.monotonic()
    fleet.wait_until(
        f"job {job_id} to run two more steps",
        lambda: (fleet.job(job_id)["progress"] - first) * total >= 2,
    )
    steps = (fleet.job(job_id)["progress"] - first) * total
    return (time.monotonic() - started) / steps


def assert_published_once(fleet: Fleet, job_id: str, model: str) -> dict[str, Any]:
    """One version, whose recorded artifacts are exactly what storage holds for the job."""
    job = fleet.job(job_id)
    assert job["status"] == "succeeded", job
    [version] = fleet.versions(model)
    assert version["id"] == job["model_version_id"]
    attempt_folders = sorted((fleet.storage / "models" / job_id).iterdir())
    assert [p.name for p in attempt_folders] == [f"attempt-{job['attempt']}"]
    stored = fleet.stored(f"models/{job_id}/attempt-{job['attempt']}")
    assert stored == sorted(a["name"] for a in version["artifacts"])
    for artifact in version["artifacts"]:
        data = fleet.client.get(
            f"/v1/models/{model}/versions/{version['version']}/artifacts/{artifact['name']}"
        ).content
        assert hashlib.sha256(data).hexdigest() == artifact["sha256"]
    assert not (fleet.storage / "jobs" / job_id).exists(), "the checkpoint outlived its job"
    return version


def test_sigkill_mid_epoch_resumes_from_last_checkpoint(fleet: Fleet, digits: str) -> None:
    first = fleet.start_worker()
    job_id = fleet.submit(digits, "killed", epochs=3)
    # Inside the second epoch: the first epoch's checkpoint exists, the second's not yet. The
    # kill follows the first progress write past the epoch boundary, leaving the most steps
    # of margin before the second epoch's checkpoint, whatever this machine's step time.
    wait_for_step(fleet, job_id, STEPS_PER_EPOCH + 1)
    assert fleet.epochs(job_id) == [1]
    first.kill(signal.SIGKILL)
    first.wait_exit()

    second = fleet.start_worker()
    fleet.wait(job_id, {"succeeded", "failed", "cancelled"})
    statuses = fleet.statuses(job_id)
    print("status events:", statuses)
    assert statuses[1] == {"status": "running", "worker": first.identity}
    assert {"status": "queued", "reason": "lease_expired"} in statuses
    assert {"status": "running", "worker": second.identity} in statuses
    [resumed] = [s for s in statuses if s["status"] == "resumed"]
    assert resumed == {"status": "resumed", "completed_epochs": 1, "steps_into_epoch": 0}
    # Epoch 1 ran once (not again after the kill); epochs 2 and 3 ran on the second worker.
    assert fleet.epochs(job_id) == [1, 2, 3]
    assert fleet.job(job_id)["attempt"] == 2
    assert_published_once(fleet, job_id, "killed")


def test_duplicate_delivery_runs_once(fleet: Fleet, digits: str) -> None:
    # The API sends the task once; a broker redelivery sends the same message again. Both are
    # held aside while two workers start and block on the empty queue, then put back in one
    # step: each blocked worker takes one at the same moment, and both race to claim the job.
    broker = fleet.broker()
    job_id = fleet.submit(digits, "twice", epochs=1)
    create_celery_for(fleet).send_task(TRAIN_TASK, args=[job_id], queue=CPU_QUEUE)
    assert broker.llen(CPU_QUEUE) == 2
    broker.rename(CPU_QUEUE, HELD_QUEUE)
    workers = fleet.start_workers(2)
    fleet.wait_until("both workers blocked on the queue", lambda: blocked_consumers(fleet) == 2)
    broker.rename(HELD_QUEUE, CPU_QUEUE)
    fleet.wait(job_id, {"succeeded", "failed", "cancelled"})
    received = re.compile(rf"Task {re.escape(TRAIN_TASK)}\[[^\]]+\] received")
    for worker in workers:
        assert len(received.findall(worker.text())) == 1, f"{worker.name}: not one delivery"
    # The database holds the claims: one move to running, one attempt.
    running = [s for s in fleet.statuses(job_id) if s["status"] == "running"]
    assert len(running) == 1, running
    assert running[0]["worker"] in {worker.identity for worker in workers}
    assert fleet.job(job_id)["attempt"] == 1
    assert_published_once(fleet, job_id, "twice")


def blocked_consumers(fleet: Fleet) -> int:
    """Connections to the fleet's Redis database that wait in BRPOP for a task message."""
    broker = fleet.broker()
    database = str(broker.connection_pool.connection_kwargs.get("db", 0))
    return sum(1 for c in broker.client_list() if c["db"] == database and c["cmd"] == "brpop")


def create_celery_for(fleet: Fleet) -> Any:
    from service.settings import Settings

    return create_celery(Settings(broker_url=fleet.redis_url, data_dir=fleet.root / "data"))


def test_job_that_kills_its_worker_fails_after_configured_losses(fleet: Fleet, digits: str) -> None:
    job_id = fleet.submit(digits, "crasher", epochs=20)
    for attempt in range(1, MAX_WORKER_LOSSES + 1):
        worker = fleet.start_worker()
        fleet.wait_until(
            f"attempt {attempt} running", partial(attempt_running, fleet, job_id, attempt)
        )
        worker.kill(signal.SIGKILL)  # as the kernel's OOM killer would
        worker.wait_exit()
    failed = fleet.wait(job_id, {"succeeded", "failed", "cancelled"}, timeout=60)
    assert failed["status"] == "failed"
    assert failed["error_code"] == "worker_lost"
    assert f"vanished {MAX_WORKER_LOSSES} times" in failed["error_message"]
    # It does not loop: a fresh worker finds nothing to run. Once it waits on the queue, the
    # queue is empty and the job is terminal, no message for it can come any more.
    idle = fleet.start_worker()
    fleet.wait_until("the fresh worker blocked on the queue", lambda: blocked_consumers(fleet) == 1)
    assert fleet.broker().llen(CPU_QUEUE) == 0
    assert f"Task {TRAIN_TASK}[" not in idle.text()
    assert fleet.job(job_id)["attempt"] == MAX_WORKER_LOSSES
    assert not (fleet.storage / "jobs" / job_id).exists()
    assert fleet.versions("crasher") == []


def attempt_running(fleet: Fleet, job_id: str, attempt: int) -> bool:
    job = fleet.job(job_id)
    return bool((job["status"], job["attempt"]) == ("running", attempt) and job["progress"] > 0)


def test_job_past_its_deadline_fails(fleet: Fleet, digits: str) -> None:
    fleet.start_worker()
    job_id = fleet.submit(digits, "late", epochs=50, max_runtime_seconds=8)
    failed = fleet.wait(job_id, {"succeeded", "failed", "cancelled"}, timeout=120)
    assert failed["status"] == "failed"
    assert failed["error_code"] == "deadline_exceeded"
    assert "max_runtime_seconds" in failed["error_message"]
    assert failed["deadline_at"] is not None
    assert 0 < failed["progress"] < 1
    assert fleet.versions("late") == []
    assert not (fleet.storage / "jobs" / job_id).exists()


def test_sigterm_checkpoints_and_hands_the_job_back(fleet: Fleet, digits: str) -> None:
    first = fleet.start_worker()
    job_id = fleet.submit(digits, "handed", epochs=3)
    wait_for_step(fleet, job_id, STEPS_PER_EPOCH + 1)
    first.kill(signal.SIGTERM)
    assert first.wait_exit(timeout=60) == 0
    queued = fleet.job(job_id)
    assert queued["status"] == "queued"
    assert fleet.statuses(job_id)[-1] == {"status": "queued", "reason": "worker_shutdown"}
    done_before = round(queued["progress"] * 3 * STEPS_PER_EPOCH)
    assert STEPS_PER_EPOCH < done_before < 2 * STEPS_PER_EPOCH, "handed back inside epoch 2"

    fleet.start_worker()
    fleet.wait(job_id, {"succeeded", "failed", "cancelled"})
    [resumed] = [s for s in fleet.statuses(job_id) if s["status"] == "resumed"]
    # It continues from the step the first worker stopped at, not from the epoch's start.
    assert resumed["completed_epochs"] == 1
    assert resumed["steps_into_epoch"] == done_before - STEPS_PER_EPOCH
    assert fleet.epochs(job_id) == [1, 2, 3]
    assert fleet.job(job_id)["attempt"] == 2
    assert_published_once(fleet, job_id, "handed")


def test_crash_between_artifacts_and_version_commit(fleet: Fleet, digits: str) -> None:
    database = make_url(fleet.env["THAW_DATABASE_URL"]).set(drivername="postgresql")
    address = database.render_as_string(hide_password=False)
    blocker = psycopg.connect(address)
    # Activity is read outside the blocker's transaction, which would see one frozen snapshot.
    monitor = psycopg.connect(address, autocommit=True)
    first = fleet.start_worker()
    job_id = fleet.submit(digits, "torn", epochs=1)
    try:
        # Publishing now writes the artifacts, then waits on the table lock inside its
        # transaction: the worker dies exactly between the two.
        blocker.execute("LOCK TABLE model_versions IN ACCESS EXCLUSIVE MODE")
        fleet.wait_until(
            "artifacts written and the commit waiting",
            lambda: bool(fleet.stored(f"models/{job_id}/attempt-1")) and publish_waiting(monitor),
        )
        first.kill(signal.SIGKILL)
        first.wait_exit()
        assert fleet.stored(f"models/{job_id}/attempt-1"), "the orphan is there before recovery"
    finally:
        blocker.rollback()
        blocker.close()
        monitor.close()
    assert fleet.job(job_id)["model_version_id"] is None
    assert fleet.versions("torn") == []

    fleet.start_worker()
    fleet.wait(job_id, {"succeeded", "failed", "cancelled"})
    assert_published_once(fleet, job_id, "torn")
    # The second attempt resumed after the last epoch: it trained nothing again.
    assert fleet.epochs(job_id) == [1]


def publish_waiting(connection: psycopg.Connection[Any]) -> bool:
    row = connection.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND query ILIKE 'INSERT INTO model_versions%%'"
    ).fetchone()
    return bool(row and row[0] == 1)


def test_cancel_of_a_queued_job_means_it_never_starts(fleet: Fleet, digits: str) -> None:
    job_id = fleet.submit(digits, "never", epochs=1)
    assert fleet.client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    worker = fleet.start_worker()
    fleet.wait_until(
        "the task message delivered", lambda: "this delivery does nothing" in worker.text()
    )
    job = fleet.job(job_id)
    assert (job["status"], job["attempt"]) == ("cancelled", 0)
    assert [s["status"] for s in fleet.statuses(job_id)] == ["queued", "cancelled"]


def test_cancel_stops_a_running_job_within_a_step(fleet: Fleet, digits: str) -> None:
    fleet.start_worker()
    # Larger images: a step of about a second, longer than the one-second progress writes.
    job_id = fleet.submit(digits, "stopped", epochs=20, image_size=160)
    total_steps = 20 * STEPS_PER_EPOCH
    wait_for_step(fleet, job_id, 1)
    step_seconds = seconds_per_step(fleet, job_id)
    seen = fleet.job(job_id)
    assert fleet.client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelling"
    # Generous: a stop takes a step or two; the bound only turns a hang into a failure.
    timeout = max(60.0, 30 * step_seconds)
    ended = fleet.wait(job_id, {"succeeded", "failed", "cancelled"}, timeout=timeout)
    assert ended["status"] == "cancelled"
    steps_after_cancel = round((ended["progress"] - seen["progress"]) * total_steps)
    print(f"steps run after the cancel was sent: {steps_after_cancel}")
    # At most the step in flight, plus one the last progress write had not counted yet.
    assert steps_after_cancel <= 2
    assert ended["model_version_id"] is None
    assert fleet.versions("stopped") == []
    assert not (fleet.storage / "models" / job_id).exists()
    assert not (fleet.storage / "jobs" / job_id).exists()


def test_cancel_survives_a_worker_restart(fleet: Fleet, digits: str) -> None:
    first = fleet.start_worker()
    job_id = fleet.submit(digits, "dropped", epochs=20)
    wait_for_step(fleet, job_id, 2)
    first.kill(signal.SIGKILL)
    first.wait_exit()
    # The cancel arrives while no worker is alive; the job must not run again afterwards.
    assert fleet.client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelling"
    fleet.start_worker()
    ended = fleet.wait(job_id, {"succeeded", "failed", "cancelled"}, timeout=60)
    assert ended["status"] == "cancelled"
    assert ended["attempt"] == 1
    assert [s["status"] for s in fleet.statuses(job_id)].count("running") == 1
    assert fleet.versions("dropped") == []
    assert not (fleet.storage / "jobs" / job_id).exists()


def test_abandoned_job_past_its_deadline_fails_without_a_worker(fleet: Fleet, digits: str) -> None:
    worker = fleet.start_worker()
    # The deadline must come after the lease lapses: room for a slow start, the lease, and
    # several reaper passes, yet before fifty epochs could end.
    deadline = 4 * LEASE_SECONDS
    job_id = fleet.submit(digits, "abandoned", epochs=50, max_runtime_seconds=deadline)
    wait_for_step(fleet, job_id, 1)
    worker.kill(signal.SIGKILL)
    worker.wait_exit()
    # No worker is left: the lease lapses, the job is queued again, and the reaper ends it at
    # its deadline rather than leaving it queued for ever.
    failed = fleet.wait(job_id, {"succeeded", "failed", "cancelled"}, timeout=deadline + 60)
    assert (failed["status"], failed["error_code"]) == ("failed", "deadline_exceeded")
    statuses = fleet.statuses(job_id)
    assert {"status": "queued", "reason": "lease_expired"} in statuses
    assert statuses[-1] == {"status": "failed", "reason": "deadline_exceeded"}
    assert not (fleet.storage / "jobs" / job_id).exists()
