"""Shared fixtures. Postgres and Redis are used for real; with THAW_REQUIRE_SERVICES=1 a missing
service fails the run instead of skipping the tests that need it."""

import io
import os
import secrets
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from service.auth.service import create_key
from service.cli import app as cli
from service.cli import migrate_database
from service.client import ThawClient
from service.context import AppContext
from service.main import create_app
from service.settings import Settings

REQUIRE_SERVICES = os.environ.get("THAW_REQUIRE_SERVICES") == "1"
POSTGRES_ADMIN_URL = os.environ.get(
    "THAW_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("THAW_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def service_missing(what: str, exc: Exception) -> None:
    service_absent(f"{what} is not reachable: {exc}")


def service_absent(message: str) -> None:
    """Skip for lack of a service, or fail where every service is required (CI)."""
    if REQUIRE_SERVICES:
        pytest.fail(f"{message} (THAW_REQUIRE_SERVICES=1)")
    pytest.skip(message)


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """A new, empty Postgres database, dropped afterwards; yields its URL."""
    from sqlalchemy import create_engine, text

    name = f"thaw_test_{secrets.token_hex(4)}"
    # Pre-ping: the reliability tests restart Postgres under this engine's pooled connection.
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        service_missing("PostgreSQL", exc)
    try:
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh, empty Postgres database for this test session."""
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except Exception as exc:
        service_missing("Redis", exc)
    client.flushdb()
    return REDIS_URL


ON_POSTGRES_TOO = "on_postgres_too"
ONNX_EXPORT = "onnx_export"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{ON_POSTGRES_TOO}: run an API test on Postgres as well as SQLite, for the job "
        "lifecycle and its conditional updates, which SQLite's whole-file lock cannot race",
    )
    config.addinivalue_line(
        "markers",
        f"{ONNX_EXPORT}: an API test whose jobs publish `model.onnx`, as by default; the others "
        "skip the export (seconds of CPU a job), which cannot fail a publish",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marked = metafunc.definition.get_closest_marker(ON_POSTGRES_TOO)
    if marked and "job_database" in metafunc.fixturenames:
        metafunc.parametrize("job_database", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def job_database(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """The API's database: SQLite in the data folder (None), or a fresh Postgres database."""
    if getattr(request, "param", "sqlite") == "sqlite":
        yield None
        return
    with fresh_postgres_database() as url:
        yield url


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    return Settings(data_dir=data_dir, reaper_interval_seconds=3600, **overrides)


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder holding only a migrated SQLite database, migrated once per session: a
    test's copy of it is where `migrate_database` would leave a fresh folder, without the
    migrations' cost per test (about 0.3 s of CPU each)."""
    data_dir = tmp_path_factory.mktemp("migrated") / "data"
    migrate_database(make_settings(data_dir))
    return data_dir


@pytest.fixture
def settings(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    job_database: str | None,
    migrated_sqlite: Path,
) -> Settings:
    """Embedded settings (folder store, folder broker) in a fresh data folder, on SQLite, or
    on Postgres too for tests marked `on_postgres_too`; ONNX export only for tests marked
    `onnx_export`."""
    data_dir = tmp_path / "data"
    onnx_export = request.node.get_closest_marker(ONNX_EXPORT) is not None
    settings = make_settings(data_dir, database_url=job_database, onnx_export=onnx_export)
    if job_database is None:
        shutil.copytree(migrated_sqlite, data_dir)
    else:
        migrate_database(settings)
    return settings


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def context(client: TestClient) -> AppContext:
    app_context: AppContext = client.app.state.context  # type: ignore[attr-defined]
    return app_context


def new_key(context: AppContext, tenant: str) -> dict[str, str]:
    with context.db.session() as session:
        _, key = create_key(session, tenant_name=tenant)
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def auth(context: AppContext) -> dict[str, str]:
    return new_key(context, "team-a")


def version_folder(context: AppContext, version_id: str) -> Path:
    """Where storage holds a model version's artifacts."""
    from service.tables import ModelVersion

    with context.db.session() as session:
        prefix = session.get_one(ModelVersion, version_id).artifact_prefix
    return context.store.local_path(prefix)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def digits_split(
    holdout_per_class: int = 10,
) -> tuple[list[tuple[np.ndarray, int]], list[tuple[np.ndarray, int]]]:
    """sklearn's 8x8 digits as 8-bit images: (training pool, held-out set kept out of uploads)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).astype(np.uint8)
    pool: list[tuple[np.ndarray, int]] = []
    held_out: list[tuple[np.ndarray, int]] = []
    seen: dict[int, int] = {}
    for image, label in zip(images, digits.target, strict=True):
        count = seen.get(int(label), 0)
        seen[int(label)] = count + 1
        (held_out if count < holdout_per_class else pool).append((image, int(label)))
    return pool, held_out


def zip_of_classes(items: list[tuple[np.ndarray, int]], names: list[str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for index, (image, label) in enumerate(items):
            folder = names[label] if names else f"digit_{label}"
            archive.writestr(f"digits/{folder}/{index:05d}.png", png_bytes(image))
    return buffer.getvalue()


@contextmanager
def served_over_http(app: Any) -> Iterator[str]:
    """`app` (already started, e.g. by a TestClient) also behind a real HTTP server on a free
    local port, for clients that speak HTTP themselves (tritonclient): `host:port`."""
    import socket
    import threading

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    # The app's lifespan already ran in its TestClient: not a second time here.
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the HTTP server did not start")
            threading.Event().wait(0.01)
        host, port = sock.getsockname()
        yield f"{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def relay(client: TestClient) -> httpx.MockTransport:
    """Requests of another httpx client, answered by the test client's app."""

    def answer(request: httpx.Request) -> httpx.Response:
        response = client.request(
            request.method, str(request.url), headers=request.headers, content=request.content
        )
        return httpx.Response(
            response.status_code, headers=response.headers, content=response.content
        )

    return httpx.MockTransport(answer)


def run_cli(
    client: TestClient, auth: dict[str, str], arguments: list[str], *, exit_code: int = 0
) -> str:
    """A `thaw` client command in this process against the test client's app (no server
    process); its output, stdout and stderr together."""
    key = auth["Authorization"].removeprefix("Bearer ")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("service.client.ThawClient", partial(ThawClient, transport=relay(client)))
        result = CliRunner().invoke(
            cli,
            [*arguments, "--url", "http://testserver", "--api-key", key],
            env={"COLUMNS": "200"},
        )
    assert result.exit_code == exit_code, result.output
    return result.output
