"""End to end over HTTP against real processes, as an operator runs them:

- fleet: `thaw migrate`, a Celery worker process (`thaw worker`), the API (`thaw api`, one
  process per core), with PostgreSQL as the database and Redis as the broker (the commands
  docker-compose.yml runs);
- embedded: `thaw serve` alone on SQLite with its folder broker, stopped and started again.

Each uploads half of sklearn's digits (every other image, less a held-out set: the processes are
under test here, and half the images halve the training), fine-tunes a pretrained
EfficientNet-Lite0, and classifies the held-out digits through the predict endpoint."""

import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import digits_split, png_bytes, zip_of_classes
from tests.processes import THAW, create_key, free_port, poll, running, thaw_env, wait_ready

JOB_TIMEOUT = 420.0
SPEC = {
    "model": "digits",
    "base_model": "efficientnet_lite0",
    "strategy": "freeze_unfreeze",
    "head_epochs": 3,
    "epochs": 5,
    "batch_size": 32,
    "lr": 0.01,
    "image_size": 64,
    "seed": 7,
    # One run: a set this small refits by default, a second run these process tests do not
    # need (a refit through the job code is in test_registry.py and test_text_inference.py).
    "refit": False,
}


def train_and_predict(client: httpx.Client, **spec: Any) -> tuple[str, float]:
    """Upload, train (`spec` over `SPEC`), predict; returns the job id and held-out accuracy."""
    pool, held_out = digits_split()
    pool = pool[::2]
    upload = client.post("/v1/datasets", files={"file": ("digits.zip", zip_of_classes(pool))})
    assert upload.status_code == 202, upload.text
    dataset = poll(client, f"/v1/datasets/{upload.json()['id']}", {"ready", "failed"}, 120)
    assert dataset["status"] == "ready", dataset
    assert dataset["num_images"] == len(pool)

    job = client.post("/v1/jobs", json={**SPEC, **spec, "dataset": dataset["id"]})
    assert job.status_code == 201, job.text
    finished = poll(
        client, f"/v1/jobs/{job.json()['id']}", {"succeeded", "failed", "cancelled"}, JOB_TIMEOUT
    )
    assert finished["status"] == "succeeded", finished
    events = client.get(f"/v1/jobs/{finished['id']}/events", params={"limit": 200}).json()["data"]
    assert len([e for e in events if e["kind"] == "epoch"]) == SPEC["epochs"]

    correct = 0
    for start in range(0, len(held_out), 50):
        batch = held_out[start : start + 50]
        files = [
            ("images", (f"{start + i}.png", png_bytes(image))) for i, (image, _) in enumerate(batch)
        ]
        answer = client.post(
            "/v1/models/digits/versions/1/predict", files=files, data={"top_k": "3"}
        )
        assert answer.status_code == 200, answer.text
        for (_, label), prediction in zip(batch, answer.json()["predictions"], strict=True):
            correct += prediction["top"][0]["label"] == f"digit_{label}"
    accuracy = correct / len(held_out)
    print(f"held-out accuracy: {accuracy:.3f} on {len(held_out)} digits")
    return str(finished["id"]), accuracy


def cancel_while_running(client: httpx.Client, dataset_id: str) -> None:
    spec = {**SPEC, "model": "never", "strategy": "fine_tune", "epochs": 50, "dataset": dataset_id}
    del spec["head_epochs"]
    created = client.post("/v1/jobs", json=spec)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    poll(client, f"/v1/jobs/{job_id}", {"running"}, 120)
    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] in {"cancelling", "cancelled"}
    ended = poll(client, f"/v1/jobs/{job_id}", {"cancelled", "succeeded", "failed"}, 60)
    assert ended["status"] == "cancelled"
    assert ended["model_version_id"] is None
    assert client.get("/v1/models/never").status_code == 404


@pytest.mark.e2e
def test_fleet_processes_on_postgres_and_redis(
    tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    env = thaw_env(tmp_path / "data", THAW_DATABASE_URL=postgres_url, THAW_BROKER_URL=redis_url)
    subprocess.run([*THAW, "migrate"], env=env, check=True)
    headers = create_key(env, "e2e")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    worker_log, api_log = tmp_path / "worker.log", tmp_path / "api.log"
    api = [*THAW, "api", "--port", str(port)]
    with (
        running([*THAW, "worker", "--queues", "cpu,datasets"], env, worker_log, signal.SIGTERM),
        running(api, env, api_log) as server,
    ):
        wait_ready(base, server, api_log)
        with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
            job_id, accuracy = train_and_predict(client)
            assert accuracy >= 0.85
            cancel_while_running(client, client.get(f"/v1/jobs/{job_id}").json()["dataset_id"])
    assert "thaw.train_job" in worker_log.read_text()


@pytest.mark.e2e
def test_embedded_serve_survives_restart(tmp_path: Path) -> None:
    env = thaw_env(tmp_path / "data")
    headers = create_key(env, "solo")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve = [*THAW, "serve", "--port", str(port)]
    with running(serve, env, tmp_path / "serve1.log") as server:
        wait_ready(base, server, tmp_path / "serve1.log")
        with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
            job_id, accuracy = train_and_predict(client)
            assert accuracy >= 0.85
            version = client.get("/v1/models/digits/versions/1").json()
    # `running` stopped it as an operator would; a crash on the way out would
    # leave the restart below to start from whatever it left behind.
    assert server.returncode == 0

    with running(serve, env, tmp_path / "serve2.log") as server:
        wait_ready(base, server, tmp_path / "serve2.log")
        with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
            assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
            assert client.get("/v1/models/digits/versions/1").json() == version
            _, held_out = digits_split()
            answer = client.post(
                "/v1/models/digits/versions/1/predict",
                files=[("images", ("x.png", png_bytes(held_out[0][0])))],
            )
            assert answer.status_code == 200
            assert answer.json()["predictions"][0]["top"][0]["label"].startswith("digit_")
