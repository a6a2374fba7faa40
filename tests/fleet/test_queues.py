"""Queues that cannot strand a job: workers announce the queues they consume; a job whose queue
no live worker consumes says so (`waiting_for_worker`, the queue, an event) and goes back to its
queue when one appears; a job queued too long is re-sent; the embedded default refuses a GPU job
it could never run."""

import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from service.cli import migrate_database
from service.context import AppContext
from service.jobs.reaper import match_jobs_to_live_workers
from service.main import create_app
from service.queues import RedisConsumers, this_host_has_cuda
from tests.conftest import make_settings, new_key
from tests.processes import running, thaw_env
from tests.test_api import assert_error, ready_dataset, small_spec


@pytest.fixture
def fleet_api(tmp_path: Path, redis_url: str) -> Iterator[tuple[TestClient, dict[str, str]]]:
    """An API whose broker (and shared state) is Redis: a fleet, its workers elsewhere."""
    redis.Redis.from_url(redis_url).flushdb()
    settings = make_settings(tmp_path / "data", broker_url=redis_url, queue_resend_seconds=60)
    migrate_database(settings)
    with TestClient(create_app(settings)) as client:
        yield client, new_key(client.app.state.context, "team-a")  # type: ignore[attr-defined]


def _statuses(client: TestClient, auth: dict[str, str], job_id: str) -> list[dict[str, Any]]:
    events = client.get(f"/v1/jobs/{job_id}/events?limit=200", headers=auth).json()["data"]
    return [event for event in events if event["kind"] in ("status", "resent")]


def _messages(redis_url: str, queue: str) -> int:
    return int(redis.Redis.from_url(redis_url).llen(queue))


def test_a_job_no_live_worker_consumes_waits_visibly_then_goes_back_to_its_queue(
    fleet_api: tuple[TestClient, dict[str, str]], redis_url: str
) -> None:
    client, auth = fleet_api
    context: AppContext = client.app.state.context  # type: ignore[attr-defined]
    RedisConsumers(redis_url).announce(queues=["cpu", "datasets"], worker="cpu-host")
    dataset_id = ready_dataset(client, context, auth)
    created = client.post("/v1/jobs", headers=auth, json=small_spec(dataset_id, device="cuda"))
    assert created.status_code == 201, created.text  # a fleet may have a GPU host
    job_id = created.json()["id"]
    assert _messages(redis_url, "gpu") == 1

    match_jobs_to_live_workers(context)
    job = client.get(f"/v1/jobs/{job_id}", headers=auth).json()
    assert (job["status"], job["queue"]) == ("waiting_for_worker", "gpu")
    assert _statuses(client, auth, job_id)[-1]["data"] == {
        "status": "waiting_for_worker",
        "queue": "gpu",
        "reason": "no live worker consumes the 'gpu' queue",
    }
    match_jobs_to_live_workers(context)  # nothing new to say
    assert len(_statuses(client, auth, job_id)) == 2
    signed_in = {"Cookie": f"thaw_key={auth['Authorization'].removeprefix('Bearer ')}"}
    page = client.get(f"/ui/jobs/{job_id}", headers=signed_in)
    assert 'id="cancel"' in page.text, "the dashboard lets a waiting job be cancelled"

    RedisConsumers(redis_url).announce(queues=["gpu"], worker="gpu-host")
    match_jobs_to_live_workers(context)
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).json()["status"] == "queued"
    assert _statuses(client, auth, job_id)[-1]["data"] == {"status": "queued", "queue": "gpu"}
    assert _messages(redis_url, "gpu") == 2  # re-sent: the first may have been consumed

    cancelled = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth).json()
    assert cancelled["status"] == "cancelled"
    assert 'id="cancel"' not in client.get(f"/ui/jobs/{job_id}", headers=signed_in).text


def test_a_job_queued_too_long_is_sent_again(
    fleet_api: tuple[TestClient, dict[str, str]], redis_url: str
) -> None:
    client, auth = fleet_api
    context: AppContext = client.app.state.context  # type: ignore[attr-defined]
    RedisConsumers(redis_url).announce(queues=["cpu"], worker="cpu-host")
    dataset_id = ready_dataset(client, context, auth)
    job_id = client.post("/v1/jobs", headers=auth, json=small_spec(dataset_id)).json()["id"]
    redis.Redis.from_url(redis_url).delete("cpu")  # the message is lost, the broker is not
    match_jobs_to_live_workers(context)
    assert _messages(redis_url, "cpu") == 0  # not queued long enough yet

    context.settings.queue_resend_seconds = 0.5
    time.sleep(1.0)
    match_jobs_to_live_workers(context)
    assert _messages(redis_url, "cpu") == 1
    resent = _statuses(client, auth, job_id)[-1]
    assert resent["kind"] == "resent"
    assert resent["data"]["queue"] == "cpu"
    assert resent["data"]["queued_seconds"] >= 1
    match_jobs_to_live_workers(context)  # the re-send restarted the clock
    assert _messages(redis_url, "cpu") == 1
    client.post(f"/v1/jobs/{job_id}/cancel", headers=auth)


def test_the_embedded_default_refuses_a_gpu_job_without_a_gpu(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    if this_host_has_cuda():
        pytest.skip("this machine has a GPU: the embedded default can run the job")
    dataset_id = ready_dataset(client, context, auth)
    refused = client.post("/v1/jobs", headers=auth, json=small_spec(dataset_id, device="cuda"))
    error = assert_error(refused, 422, "no_gpu_worker", "device")
    assert "GPU" in error["message"]
    assert client.get("/v1/jobs", headers=auth).json()["data"] == []


def test_a_real_worker_announces_the_queues_it_consumes(tmp_path: Path, redis_url: str) -> None:
    redis.Redis.from_url(redis_url).flushdb()
    env = thaw_env(tmp_path / "data", THAW_BROKER_URL=redis_url)
    command = [sys.executable, "-m", "worker", "--queues", "cpu,datasets", "--pool", "solo"]
    command += ["--hostname", "announcer@%h", "--without-gossip", "--without-mingle"]
    with running(command, env, tmp_path / "worker.log", stop_signal=signal.SIGTERM):
        deadline = time.monotonic() + 90
        while RedisConsumers(redis_url).live() != {"cpu", "datasets"}:
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-2000:]
            time.sleep(0.5)
