"""Two API replicas on separate "hosts" agree: one rate limit, and a revoked key or a deleted
version refused by both at once, though each caches keys and resolutions for minutes; a replica
that never had a model's files serves it from the object store."""

import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from service.cli import migrate_database
from service.main import create_app
from service.settings import Settings
from service.storage import open_store
from tests.conftest import fresh_postgres_database, make_settings, new_key
from tests.fleet.s3server import S3Server
from tests.processes import THAW, create_key, free_port, running, thaw_env, wait_ready
from tests.test_api import assert_error, ready_dataset
from tests.test_inference import b64, held_out_pngs
from tests.test_registry import Registry, publish

RATE_LIMIT_PER_MINUTE = 30
METRICS_TOKEN = "scrape-secret"
BUCKET = "fleet-replicas"


@dataclass
class Replicas:
    a: httpx.Client
    b: httpx.Client
    env: dict[str, str]
    """Replica A's environment, for the CLI (same database and Redis)."""
    root: Path
    store_settings: Settings
    auth: dict[str, str]
    version: dict[str, Any]

    @property
    def both(self) -> tuple[httpx.Client, httpx.Client]:
        return self.a, self.b


def _train_and_publish_to_the_store(
    root: Path, database_url: str, redis_url: str, store_settings: Settings
) -> tuple[dict[str, str], dict[str, Any]]:
    """Train `digits` v1 in a process of its own folder, then put its files in the object store
    under the same key: the replicas never see the trainer's folder."""
    settings = make_settings(root / "trainer", database_url=database_url, redis_url=redis_url)
    migrate_database(settings)
    with TestClient(create_app(settings)) as client:
        context = client.app.state.context  # type: ignore[attr-defined]
        auth = new_key(context, "team-a")
        version = publish(Registry(client, context, auth, ready_dataset(client, context, auth)))
        prefix = f"models/{version['job_id']}"
        exported = next(name for name in context.store.children(prefix))
        copy = root / "upload"
        shutil.copytree(context.store.local_path(f"{prefix}/{exported}"), copy)
        open_store(store_settings).put_dir(f"{prefix}/{exported}", copy)
    return auth, version


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, s3_server: S3Server
) -> Iterator[Replicas]:
    root = tmp_path_factory.mktemp("replicas")
    redis.Redis.from_url(redis_url).flushdb()
    s3_server.create_bucket(BUCKET)
    store_env = s3_server.env(BUCKET)
    store_settings = Settings(
        data_dir=root / "uploader",
        storage_url=store_env["THAW_STORAGE_URL"],
        s3_endpoint_url=s3_server.endpoint_url,
    )
    with fresh_postgres_database() as database_url, ExitStack() as stack:
        auth, version = _train_and_publish_to_the_store(
            root, database_url, redis_url, store_settings
        )
        clients = []
        for host in ("a", "b"):
            env = thaw_env(
                root / host,
                **store_env,
                THAW_DATABASE_URL=database_url,
                THAW_BROKER_URL=redis_url,
                THAW_RATE_LIMIT_PER_MINUTE=str(RATE_LIMIT_PER_MINUTE),
                # Caches that would hold for ten minutes: only the shared generations can
                # explain a replica refusing a key or a version at once.
                THAW_RESOLUTION_CACHE_SECONDS="600",
                THAW_API_KEY_CACHE_SECONDS="600",
                THAW_METRICS_TOKEN=METRICS_TOKEN,
                THAW_REAPER_INTERVAL_SECONDS="3600",
            )
            port = free_port()
            command = [sys.executable, "-m", "uvicorn", "--factory", "service.main:create_app"]
            command += ["--host", "127.0.0.1", "--port", str(port)]
            log = root / f"api-{host}.log"
            process = stack.enter_context(running(command, env, log))
            wait_ready(f"http://127.0.0.1:{port}", process, log)
            clients.append(
                stack.enter_context(httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60))
            )
        yield Replicas(clients[0], clients[1], env, root, store_settings, auth, version)


def _predict(client: httpx.Client, auth: dict[str, str], version: int) -> httpx.Response:
    body = {"images": [{"data": b64(png)} for png in held_out_pngs(2)]}
    return client.post(f"/v1/models/digits/versions/{version}/predict", headers=auth, json=body)


def test_a_replica_that_never_had_the_files_serves_predict(replicas: Replicas) -> None:
    answers = [_predict(client, replicas.auth, 1) for client in replicas.both]
    assert [answer.status_code for answer in answers] == [200, 200], answers[1].text
    first, second = (
        # Every answer has its own prediction id; the answers themselves must agree.
        [
            {k: v for k, v in row.items() if k != "prediction_id"}
            for row in answer.json()["predictions"]
        ]
        for answer in answers
    )
    assert first == second
    for host in ("a", "b"):
        assert not (replicas.root / host / "artifacts" / "models").exists()
        assert list((replicas.root / host / "cache" / "entries").iterdir())


def test_the_rate_limit_holds_across_two_replicas(replicas: Replicas) -> None:
    auth = create_key(replicas.env, "limited")
    answers = [
        replicas.both[call % 2].get("/v1/datasets", headers=auth)
        for call in range(2 * RATE_LIMIT_PER_MINUTE)
    ]
    allowed = [answer for answer in answers if answer.status_code == 200]
    refused = [answer for answer in answers if answer.status_code == 429]
    assert len(allowed) + len(refused) == len(answers)
    # The bucket refills at one token per two seconds while the calls run.
    assert RATE_LIMIT_PER_MINUTE <= len(allowed) <= RATE_LIMIT_PER_MINUTE + 3, len(allowed)
    assert all(int(answer.headers["Retry-After"]) >= 1 for answer in refused)


def test_a_revoked_key_is_refused_by_both_replicas_at_once(replicas: Replicas) -> None:
    auth = create_key(replicas.env, "revoked")
    for client in replicas.both:  # now cached by both
        assert client.get("/v1/me", headers=auth).status_code == 200
    prefix = auth["Authorization"].removeprefix("Bearer ")[:12]
    done = subprocess.run(
        [*THAW, "keys", "revoke", prefix], env=replicas.env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    for client in replicas.both:
        assert_error(client.get("/v1/me", headers=auth), 401, "unauthorized")


def test_metrics_answer_only_the_scrape_token(replicas: Replicas) -> None:
    assert_error(replicas.a.get("/metrics"), 401, "unauthorized")
    wrong = {"Authorization": "Bearer not-the-token"}
    assert_error(replicas.a.get("/metrics", headers=wrong), 401, "unauthorized")
    scrape = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    answer = replicas.b.get("/metrics", headers=scrape)
    assert answer.status_code == 200
    assert "thaw_predict_request_seconds" in answer.text


def test_a_deleted_version_is_refused_by_both_replicas_at_once(replicas: Replicas) -> None:
    for client in replicas.both:  # resolved, cached and loaded by both
        assert _predict(client, replicas.auth, 1).status_code == 200
    deleted = replicas.a.delete("/v1/models/digits/versions/1", headers=replicas.auth)
    assert deleted.status_code == 204, deleted.text
    for client in (replicas.b, replicas.a):
        assert_error(_predict(client, replicas.auth, 1), 404, "version_not_found")
    store = open_store(replicas.store_settings)
    assert not store.exists(f"models/{replicas.version['job_id']}")
