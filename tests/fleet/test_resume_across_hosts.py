"""A job whose worker host dies resumes on another host from the checkpoint in the object store.

Three "hosts", each its own data and cache folder: the API, worker host A and worker host B.
They share only Postgres, Redis and the S3 server. Host A is SIGKILLed inside the job's second
epoch; the API's reaper re-queues the job when A's lease runs out, and host B, which never saw
A's files, downloads the epoch-1 checkpoint from the store, trains epochs 2 and 3 and publishes
exactly one version."""

import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from service.jobs.service import checkpoint_key, latest_checkpoint_key
from service.settings import Settings
from service.storage import open_store
from tests.conftest import digits_split, fresh_postgres_database, zip_of_classes
from tests.fleet.s3server import S3Server
from tests.processes import THAW, create_key, free_port, poll, running, thaw_env, wait_ready
from tests.reliability.conftest import Worker

BUCKET = "fleet-resume"
IMAGES_PER_CLASS = 24
STEPS_PER_EPOCH = 12
"""240 digits, 192 of them training images in batches of 16."""
SPEC: dict[str, Any] = {
    "base_model": "efficientnet_lite0",
    "strategy": "fine_tune",
    "batch_size": 16,
    "lr": 0.01,
    "image_size": 64,
    "seed": 3,
    "epochs": 3,
    # One run: these tests count its steps (a small set refits by default, a second run).
    "refit": False,
}


def _digits() -> bytes:
    pool, _ = digits_split()
    seen: dict[int, int] = {}
    chosen = []
    for image, label in pool:
        if seen.get(label, 0) < IMAGES_PER_CLASS:
            seen[label] = seen.get(label, 0) + 1
            chosen.append((image, label))
    return zip_of_classes(chosen)


def _events(client: httpx.Client, job_id: str, kind: str) -> list[dict[str, Any]]:
    page = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 200}).raise_for_status()
    return [event["data"] for event in page.json()["data"] if event["kind"] == kind]


def _wait_until(what: str, check: Any, process: Worker, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if process.process.poll() is not None:
            raise AssertionError(f"worker {process.name} exited:\n{process.text()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_a_job_killed_on_host_a_finishes_on_host_b_from_the_stored_checkpoint(
    tmp_path: Path, redis_url: str, s3_server: S3Server
) -> None:
    redis.Redis.from_url(redis_url).flushdb()
    s3_server.create_bucket(BUCKET)
    with fresh_postgres_database() as database_url:
        shared = {
            **s3_server.env(BUCKET),
            "THAW_DATABASE_URL": database_url,
            "THAW_BROKER_URL": redis_url,
            "THAW_TORCH_THREADS": "1",
            # A dead host is noticed within a lease. Setup (the dataset and the checkpoint
            # come down from the store) renews the lease as training does, but nothing renews
            # it during an epoch's validation pass and checkpoint upload: on a machine at load
            # 20, 8 s expired there (epoch 3 ran twice), so the lease covers those.
            "THAW_LEASE_SECONDS": "20",
            "THAW_REAPER_INTERVAL_SECONDS": "0.5",
            "THAW_ONNX_EXPORT": "false",
        }
        hosts = {name: tmp_path / name for name in ("api-host", "host-a", "host-b")}
        envs = {name: thaw_env(folder, **shared) for name, folder in hosts.items()}
        auth = create_key(envs["api-host"], "team-a")
        base = f"http://127.0.0.1:{free_port()}"
        api = [sys.executable, "-m", "uvicorn", "--factory", "service.main:create_app"]
        api += ["--host", "127.0.0.1", "--port", base.rsplit(":", 1)[1]]

        def worker(host: str, queues: str) -> list[str]:
            return [*THAW, "worker", "--queues", queues, "--name", f"{queues}-{host}"]

        with (
            running(api, envs["api-host"], tmp_path / "api.log") as api_process,
            httpx.Client(base_url=base, headers=auth, timeout=60) as client,
        ):
            wait_ready(base, api_process, tmp_path / "api.log")
            with running(
                worker("host-a", "datasets"),
                envs["host-a"],
                tmp_path / "a-ingest.log",
                signal.SIGTERM,
            ):
                upload = client.post("/v1/datasets", files={"file": ("digits.zip", _digits())})
                assert upload.status_code == 202, upload.text
                dataset = poll(
                    client, f"/v1/datasets/{upload.json()['id']}", {"ready", "failed"}, 120
                )
            assert dataset["status"] == "ready", dataset

            log_a = tmp_path / "a.log"
            with running(worker("host-a", "cpu"), envs["host-a"], log_a, signal.SIGTERM) as a:
                host_a = Worker(name="a", process=a, log=log_a)
                host_a.wait_ready()
                created = client.post(
                    "/v1/jobs", json={**SPEC, "dataset": dataset["id"], "model": "moved"}
                )
                assert created.status_code == 201, created.text
                job_id = created.json()["id"]
                # The first progress write past epoch 1's end: its checkpoint is in the store
                # (uploaded before the epoch event), epoch 2's is several steps away.
                total = SPEC["epochs"] * STEPS_PER_EPOCH

                def past_epoch_one() -> bool:
                    job = client.get(f"/v1/jobs/{job_id}").json()
                    return bool(job["progress"] * total >= STEPS_PER_EPOCH + 1)

                _wait_until(f"job {job_id} inside epoch 2", past_epoch_one, host_a)
                a.send_signal(signal.SIGKILL)
                a.wait(timeout=60)

            assert _events(client, job_id, "epoch")[0]["global_epoch"] == 1
            store = open_store(
                Settings(
                    data_dir=tmp_path / "reader",
                    storage_url=s3_server.env(BUCKET)["THAW_STORAGE_URL"],
                    s3_endpoint_url=s3_server.endpoint_url,
                )
            )
            assert latest_checkpoint_key(store, job_id) == checkpoint_key(job_id, 1), (
                "host A left no checkpoint in the store"
            )

            log_b = tmp_path / "b.log"
            with running(worker("host-b", "cpu"), envs["host-b"], log_b, signal.SIGTERM) as b:
                Worker(name="b", process=b, log=log_b).wait_ready()
                job = poll(client, f"/v1/jobs/{job_id}", {"succeeded", "failed", "cancelled"}, 300)
            assert job["status"] == "succeeded", job

            statuses = _events(client, job_id, "status")
            print("status events:", statuses)
            assert {"status": "queued", "reason": "lease_expired"} in statuses
            [resumed] = [s for s in statuses if s["status"] == "resumed"]
            assert resumed == {"status": "resumed", "completed_epochs": 1, "steps_into_epoch": 0}
            # Epoch 1 ran once, on host A; epochs 2 and 3 on host B.
            assert [e["global_epoch"] for e in _events(client, job_id, "epoch")] == [1, 2, 3]
            assert job["attempt"] == 2

            [version] = client.get("/v1/models/moved/versions").json()["data"]
            assert version["id"] == job["model_version_id"]
            for artifact in version["artifacts"]:
                answer = client.get(
                    f"/v1/models/moved/versions/{version['version']}/artifacts/{artifact['name']}"
                )
                assert answer.status_code == 200, answer.text

    assert store.children(f"models/{job_id}") == [f"attempt-{job['attempt']}"]
    assert latest_checkpoint_key(store, job_id) is None, "the checkpoint outlived its job"
    for name, folder in hosts.items():
        assert not (folder / "artifacts" / "jobs").exists(), f"{name} kept a checkpoint on disk"
        assert not (folder / "artifacts" / "models").exists(), f"{name} holds model files"
