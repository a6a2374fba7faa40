"""`thaw api` serving one port from several processes (`THAW_API_PROCESSES`), as the Dockerfile
runs it: every process answers predict with its own model cache, `/metrics` reports the host
whichever process takes the scrape, a deletion reaches every process's resolution cache, and
Ctrl-C stops them all and removes the pooled metrics' folder."""

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service.cli import migrate_database
from service.main import create_app
from tests.conftest import make_settings, new_key
from tests.processes import THAW, free_port, running, thaw_env, wait_ready
from tests.test_api import ready_dataset
from tests.test_inference import held_out_pngs
from tests.test_registry import Registry, publish

PROCESSES = 2
# Calls sent before giving up on reaching both processes: the kernel hands each new
# connection to whichever process accepts first, so a few dozen reach both.
MOST_CALLS = 400


@dataclass
class Served:
    base: str
    auth: dict[str, str]
    version: dict[str, Any]
    scratch: Path
    """The server's TMPDIR, where `thaw api` makes the pooled metrics' folder."""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("api-processes")
    settings = make_settings(root / "data")
    migrate_database(settings)
    with TestClient(create_app(settings)) as client:
        context = client.app.state.context  # type: ignore[attr-defined]
        auth = new_key(context, "team-a")
        version = publish(Registry(client, context, auth, ready_dataset(client, context, auth)))
    scratch = root / "tmp"
    scratch.mkdir()
    env = thaw_env(
        root / "data",
        THAW_API_PROCESSES=str(PROCESSES),
        # A long-lived resolution cache: only invalidation can explain a fresh answer.
        THAW_RESOLUTION_CACHE_SECONDS="3600",
        THAW_RATE_LIMIT_PER_MINUTE="0",
        TMPDIR=str(scratch),
    )
    base = f"http://127.0.0.1:{free_port()}"
    log = root / "api.log"
    with running([*THAW, "api", "--port", base.rsplit(":", 1)[1]], env, log) as process:
        wait_ready(base, process, log)
        assert len(list(scratch.glob("thaw-metrics-*"))) == 1
        yield Served(base, auth, version, scratch)
    # `running` stopped it with Ctrl-C and checked it exited 0.
    assert list(scratch.glob("thaw-metrics-*")) == [], "the pooled metrics outlived the API"


def predict_path(version: dict[str, Any]) -> str:
    return f"/v1/models/digits/versions/{version['version']}/predict"


def call(served: Served, image: bytes) -> int:
    """One predict call on a new connection, so the kernel picks a process for it."""
    answer = httpx.post(
        served.base + predict_path(served.version),
        headers=served.auth,
        files={"images": ("x.png", image)},
        timeout=60,
    )
    return answer.status_code


def pooled(served: Served, name: str) -> float:
    text = httpx.get(f"{served.base}/metrics", timeout=10).text
    found = re.search(rf'^{name}{{version_id="{served.version["id"]}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def reach_every_process(served: Served, image: bytes) -> None:
    """Calls in parallel until every process has served one (each loads the model on its first
    call, so the pooled count of loads says so), checking on every scrape that the pooled
    count of images is every call's, whichever process answers it."""
    before = pooled(served, "thaw_predict_images_total")
    sent = 0
    with ThreadPoolExecutor(max_workers=8) as pool:
        while pooled(served, "thaw_model_cache_loads_total") < PROCESSES:
            assert sent < MOST_CALLS, "calls never reached every API process"
            assert list(pool.map(lambda _: call(served, image), range(8))) == [200] * 8
            sent += 8
            for _ in range(3):
                assert pooled(served, "thaw_predict_images_total") == before + sent


def test_every_process_serves_and_metrics_report_all_of_them(served: Served) -> None:
    reach_every_process(served, held_out_pngs(1)[0])
    assert pooled(served, "thaw_model_cache_loads_total") == PROCESSES
    assert pooled(served, "thaw_predict_images_total") >= 8


def test_a_deleted_version_is_refused_by_every_process(served: Served) -> None:
    image = held_out_pngs(1)[0]
    # Every process has the version resolved and cached for an hour.
    reach_every_process(served, image)
    path = predict_path(served.version).removesuffix("/predict")
    deleted = httpx.delete(served.base + path, headers=served.auth, timeout=30)
    assert deleted.status_code == 204, deleted.text
    # The delete ran in one process; new connections reach every one, and none answers from
    # its cache.
    with ThreadPoolExecutor(max_workers=8) as pool:
        assert set(pool.map(lambda _: call(served, image), range(32))) == {404}
