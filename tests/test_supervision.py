"""What keeps work from being stranded, in one process: the ingest lease and its reaper, the
readiness check per queue, and the supervisor's restarts (backoff, registry, metrics).
`tests/reliability/test_supervision.py` kills real workers under a real `thaw serve`."""

import logging
import os
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.context import AppContext
from service.datasets import lease
from service.datasets.service import archive_key, process_upload
from service.jobs.reaper import reap_expired_ingests
from service.queues import CONSUMER_TTL_SECONDS, FolderConsumers, consumer_registry
from service.supervision import SupervisedWorker, Supervisor, restarts_file
from service.tables import Dataset
from tests.conftest import digits_split, zip_of_classes
from tests.test_api import ready_dataset, small_spec, upload


def uploaded(client: TestClient, auth: dict[str, str]) -> str:
    """A dataset waiting for its ingest (`processing`): 3 classes of 4 digits."""
    pool, _ = digits_split()
    items = [item for label in range(3) for item in [i for i in pool if i[1] == label][:4]]
    return str(upload(client, auth, zip_of_classes(items))["id"])


def row(context: AppContext, dataset_id: str) -> Dataset:
    with context.db.session() as session:
        dataset = session.get_one(Dataset, dataset_id)
        session.expunge(dataset)
        return dataset


def claim_and_vanish(context: AppContext, dataset_id: str) -> int | None:
    """A worker claims the ingest and dies at once: its lease has already expired."""
    with context.db.session() as session:
        return lease.claim(
            session, dataset_id=dataset_id, owner="gone:1", lease=timedelta(seconds=-1)
        )


def messages(context: AppContext) -> int:
    return len(list((context.settings.broker_folder / "queue").iterdir()))


@pytest.mark.on_postgres_too
def test_an_ingest_whose_worker_vanished_goes_back_to_the_queue_and_finishes(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    dataset_id = uploaded(client, auth)
    assert claim_and_vanish(context, dataset_id) == 1
    sent = messages(context)

    assert reap_expired_ingests(context) == 1
    waiting = row(context, dataset_id)
    assert (waiting.status, waiting.lease_owner, waiting.worker_losses) == ("processing", None, 1)
    assert messages(context) == sent + 1, "the ingest task was not sent again"
    assert reap_expired_ingests(context) == 0, "a freed dataset was sent twice"

    process_upload(context=context, dataset_id=dataset_id)
    done = row(context, dataset_id)
    assert (done.status, done.attempt, done.num_labelled, done.lease_owner) == (
        "ready",
        2,
        12,
        None,
    )


@pytest.mark.on_postgres_too
def test_an_ingest_fails_with_a_reason_once_its_workers_vanished_too_often(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    dataset_id = uploaded(client, auth)
    losses = context.settings.max_worker_losses
    for attempt in range(1, losses + 1):
        assert claim_and_vanish(context, dataset_id) == attempt
        reap_expired_ingests(context)
    failed = client.get(f"/v1/datasets/{dataset_id}", headers=auth).json()
    assert failed["status"] == "failed", failed
    assert failed["error_code"] == "worker_lost", failed
    assert f"vanished {losses} times" in failed["error_message"]
    assert not context.store.exists(archive_key(dataset_id))
    # A late delivery finds nothing to do.
    process_upload(context=context, dataset_id=dataset_id)
    assert row(context, dataset_id).attempt == losses


def test_a_delivery_of_an_ingest_held_by_a_live_worker_does_nothing(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    dataset_id = uploaded(client, auth)
    with context.db.session() as session:
        lease.claim(session, dataset_id=dataset_id, owner="alive:1", lease=timedelta(minutes=5))
    process_upload(context=context, dataset_id=dataset_id)
    held = row(context, dataset_id)
    assert (held.status, held.attempt, held.lease_owner) == ("processing", 1, "alive:1")
    assert reap_expired_ingests(context) == 0


def workers_check(client: TestClient) -> tuple[int, str]:
    answer = client.get("/readyz")
    return answer.status_code, str(answer.json()["checks"]["workers"])


def test_readyz_is_not_ready_while_a_queue_with_work_has_no_live_worker(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    registry = consumer_registry(context.settings)
    assert workers_check(client) == (200, "ok"), "no work: no worker needed"
    dataset_id = ready_dataset(client, context, auth)
    created = client.post("/v1/jobs", headers=auth, json=small_spec(dataset_id))
    assert created.status_code == 201, created.text
    uploaded(client, auth)

    answer = client.get("/readyz")
    assert answer.status_code == 503, answer.text
    assert answer.json()["checks"]["workers"] == "no live worker for cpu, datasets"
    assert answer.json()["error"]["code"] == "not_ready"
    assert "no live worker consumes the 'cpu' queue" in answer.json()["error"]["message"]

    registry.announce(queues=["cpu"], worker="train@host")
    assert workers_check(client) == (503, "no live worker for datasets")
    registry.announce(queues=["datasets"], worker="datasets@host")
    assert workers_check(client) == (200, "ok")
    registry.forget("train@host")
    assert workers_check(client) == (503, "no live worker for cpu")


def test_the_supervisor_restarts_a_dead_worker_with_backoff_and_counts_it(
    client: TestClient, context: AppContext, caplog: pytest.LogCaptureFixture
) -> None:
    registry = consumer_registry(context.settings)
    counts = restarts_file(context.settings)
    worker = SupervisedWorker(
        "train", "train@host", [sys.executable, "-c", "import time; time.sleep(600)"]
    )
    supervisor = Supervisor([worker], registry=registry, counts=counts)
    caplog.set_level(logging.WARNING, logger="service.supervision")
    assert "thaw_worker_restarts" not in client.get("/metrics").text
    supervisor.start()
    try:
        assert 'thaw_worker_restarts_total{worker="train"} 0.0' in client.get("/metrics").text
        for restart in (1, 2):
            registry.announce(queues=["cpu"], worker="train@host")
            dead = supervisor.process("train")
            dead.kill()
            wait_for(lambda dead=dead: supervisor.process("train") is not dead)
            assert registry.live() == set(), "the dead worker was not forgotten"
            scraped = client.get("/metrics").text
            assert f'thaw_worker_restarts_total{{worker="train"}} {restart}.0' in scraped
        logged = [r.getMessage() for r in caplog.records]
        assert any("killed by SIGKILL; restarting it in 1 s (restart 1)" in m for m in logged)
        assert any("killed by SIGKILL; restarting it in 2 s (restart 2)" in m for m in logged)
    finally:
        supervisor.stop()
    assert supervisor.process("train").poll() is not None
    assert not counts.exists()
    assert "thaw_worker_restarts" not in client.get("/metrics").text


def wait_for(check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_folder_registry_forgets_announcements_older_than_their_ttl(tmp_path: Path) -> None:
    registry = FolderConsumers(tmp_path / "consumers")
    registry.announce(queues=["cpu", "datasets"], worker="w@h")
    assert registry.live() == {"cpu", "datasets"}
    stale = time.time() - CONSUMER_TTL_SECONDS - 1
    os.utime(tmp_path / "consumers" / "cpu+w@h", (stale, stale))
    assert registry.live() == {"datasets"}
