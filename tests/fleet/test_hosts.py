"""Separate "hosts" with no folder in common: an API process and a dataset worker, each with its
own data and cache folder, sharing only Postgres, Redis and the S3 server. A dataset uploaded to
the API is ingested by the worker through the object store. (A job killed on one host and
finished on another from its checkpoint in the store: `test_resume_across_hosts.py`.)"""

import signal
import sys
from pathlib import Path

import httpx
import redis

from service.datasets.service import archive_key, files_prefix, manifest_key
from service.settings import Settings
from service.storage import open_store
from tests.conftest import digits_split, fresh_postgres_database, zip_of_classes
from tests.fleet.s3server import S3Server
from tests.processes import create_key, free_port, poll, running, thaw_env, wait_ready

BUCKET = "fleet-hosts"


def test_a_dataset_uploaded_to_the_api_is_ingested_on_another_host(
    tmp_path: Path, redis_url: str, s3_server: S3Server
) -> None:
    redis.Redis.from_url(redis_url).flushdb()
    s3_server.create_bucket(BUCKET)
    pool, _ = digits_split()
    chosen = [item for item in pool if item[1] < 3][:45]
    with fresh_postgres_database() as database_url:
        shared = {
            **s3_server.env(BUCKET),
            "THAW_DATABASE_URL": database_url,
            "THAW_BROKER_URL": redis_url,
            "THAW_REAPER_INTERVAL_SECONDS": "3600",
        }
        api_env = thaw_env(tmp_path / "api-host", **shared)
        worker_env = thaw_env(tmp_path / "worker-host", **shared)
        auth = create_key(api_env, "team-a")
        base = f"http://127.0.0.1:{free_port()}"
        api = [sys.executable, "-m", "uvicorn", "--factory", "service.main:create_app"]
        api += ["--host", "127.0.0.1", "--port", base.rsplit(":", 1)[1]]
        worker = [sys.executable, "-m", "worker", "--queues", "datasets", "--pool", "solo"]
        worker += ["--hostname", "datasets@worker-host", "--without-gossip", "--without-mingle"]
        with (
            running(api, api_env, tmp_path / "api.log") as api_process,
            running(worker, worker_env, tmp_path / "worker.log", signal.SIGTERM),
            httpx.Client(base_url=base, headers=auth, timeout=60) as client,
        ):
            wait_ready(base, api_process, tmp_path / "api.log")
            upload = client.post(
                "/v1/datasets", files={"file": ("digits.zip", zip_of_classes(chosen))}
            )
            assert upload.status_code == 202, upload.text
            dataset_id = upload.json()["id"]
            dataset = poll(client, f"/v1/datasets/{dataset_id}", {"ready", "failed"}, 120)
    assert dataset["status"] == "ready", dataset
    assert dataset["classes"] == ["digit_0", "digit_1", "digit_2"]

    store = open_store(
        Settings(
            data_dir=tmp_path / "reader",
            storage_url=s3_server.env(BUCKET)["THAW_STORAGE_URL"],
            s3_endpoint_url=s3_server.endpoint_url,
        )
    )
    assert store.exists(manifest_key(dataset_id))
    # A few shards, not one object per image.
    assert store.children(files_prefix(dataset_id)) == ["images-00000.tar"]
    for host in ("api-host", "worker-host"):
        assert not (tmp_path / host / "artifacts" / "datasets").exists(), host
    # The worker fetched the archive from the store into its own scratch folder, not a folder
    # the API wrote, and removed it once ingested.
    assert list((tmp_path / "worker-host" / "tmp").iterdir()) == []
    assert not store.exists(archive_key(dataset_id))
