"""Operator commands, run where the service runs: `serve`, `api`, `worker`, `migrate`, `keys`."""

import logging
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from service.settings import Settings, get_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

keys_app = typer.Typer(help="API keys.", no_args_is_help=True)

MIGRATIONS = Path(__file__).resolve().parent.parent.parent / "migrations"


def _setup_logging() -> None:
    logging.basicConfig(
        level=get_settings().log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def migrate_database(settings: Settings | None = None) -> None:
    from alembic import command
    from alembic.config import Config

    settings = settings or get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["url"] = settings.resolved_database_url
    config.attributes["configure_logging"] = False
    command.upgrade(config, "head")


def migrate() -> None:
    """Bring the database schema up to date (`alembic upgrade head`)."""
    _setup_logging()
    migrate_database()


def worker_command(queues: str, *, node: str) -> list[str]:
    """A Celery worker process named `node` (`name@host`; Celery expands `%h` to the host);
    `python -m worker` builds thaw's app when it starts."""
    return [
        sys.executable,
        "-m",
        "worker",
        "--queues",
        queues,
        "--pool",
        "solo",
        "--hostname",
        node,
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        "INFO",
    ]


def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated queues: cpu, gpu, datasets.")] = (
        "cpu,datasets"
    ),
    name: Annotated[str, typer.Option(help="Worker name.")] = "worker",
) -> None:
    """Run a Celery worker (one task at a time; run more processes to scale)."""
    os.execv(sys.executable, worker_command(queues, node=f"{name}@%h"))


def run_api(*, host: str, port: int, access_log: bool) -> None:
    """uvicorn serving the API in `THAW_API_PROCESSES` processes (default one per core), until
    Ctrl-C or SIGTERM. Several processes answer on one port, so their Prometheus metrics are
    pooled through a folder of their own (`PROMETHEUS_MULTIPROC_DIR`, made fresh here and
    removed at exit unless the operator set one): `/metrics` reports the host, whichever
    process answers the scrape."""
    import uvicorn

    from service.inference.metrics import MULTIPROCESS_DIR

    processes = get_settings().resolved_api_processes
    pooled = None
    if processes > 1 and MULTIPROCESS_DIR not in os.environ:
        pooled = tempfile.mkdtemp(prefix="thaw-metrics-")
        os.environ[MULTIPROCESS_DIR] = pooled
    try:
        uvicorn.run(
            "service.main:create_app",
            factory=True,
            host=host,
            port=port,
            workers=processes,
            log_level="info",
            access_log=access_log,
        )
    finally:
        if pooled is not None:
            shutil.rmtree(pooled, ignore_errors=True)


def api(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    access_log: Annotated[
        bool, typer.Option(help="Log every request (a log line per predict call).")
    ] = False,
) -> None:
    """Run the API alone (a fleet's replica): `THAW_API_PROCESSES` processes on one port. The
    database must be migrated (`thaw migrate`) and workers run elsewhere."""
    _setup_logging()
    run_api(host=host, port=port, access_log=access_log)


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[bool, typer.Option(help="Also start the worker processes.")] = True,
) -> None:
    """Run the API (`THAW_API_PROCESSES` processes), a training worker and a dataset worker on
    this machine, restarting a worker that dies.

    With no configuration everything lives under THAW_DATA_DIR (default ./thaw-data): SQLite, the
    artifact folder and a folder broker, so stopping and starting again loses nothing.
    """
    from service.context import AppContext
    from service.jobs.reaper import resend_pending
    from service.queues import consumer_registry, this_host_has_cuda
    from service.supervision import SupervisedWorker, Supervisor, restarts_file

    _setup_logging()
    settings = get_settings()
    # Children must agree on the data folder whatever their working directory.
    os.environ["THAW_DATA_DIR"] = str(settings.data_dir.resolve())
    migrate_database()
    supervised: list[SupervisedWorker] = []
    if workers:
        machine = socket.gethostname()
        training_queues = "cpu,gpu" if this_host_has_cuda() else "cpu"
        for name, queues in (("train", training_queues), ("datasets", "datasets")):
            node = f"{name}@{machine}"
            supervised.append(SupervisedWorker(name, node, worker_command(queues, node=node)))
    supervisor = Supervisor(
        supervised, registry=consumer_registry(settings), counts=restarts_file(settings)
    )
    supervisor.start()
    resend_pending(AppContext(settings))
    try:
        run_api(host=host, port=port, access_log=True)
    finally:
        supervisor.stop()


@keys_app.command("create")
def create_key(
    tenant: Annotated[str, typer.Option(help="Team name; created if new.")],
    expires_days: Annotated[
        float | None, typer.Option(help="Days until the key stops working; default: never.")
    ] = None,
) -> None:
    """Create an API key for a tenant. The key is printed once, alone on the last line."""
    from service.auth.service import create_key as create
    from service.db import utcnow

    expires_at = None if expires_days is None else utcnow() + timedelta(days=expires_days)
    with _admin_session() as session:
        api_key, plaintext = create(session, tenant_name=tenant, expires_at=expires_at)
        typer.echo(
            f"Created key {api_key.prefix}… for tenant {tenant!r}. It is shown only once:", err=True
        )
    typer.echo(plaintext)


@keys_app.command("revoke")
def revoke_key(
    prefix: Annotated[str, typer.Argument(help="The key's prefix, as `keys list` shows it.")],
) -> None:
    """Revoke a key at once: every request with it then gets 401."""
    from service.auth.service import revoke_key as revoke

    with _admin_session() as session:
        if revoke(session, prefix=prefix) is None:
            typer.echo(f"No key with prefix {prefix!r}.", err=True)
            raise typer.Exit(1)
    typer.echo(f"Revoked {prefix}.", err=True)


@keys_app.command("list")
def list_keys(
    tenant: Annotated[str | None, typer.Option(help="Only this team's keys.")] = None,
) -> None:
    """List keys by prefix, with their tenant, expiry and whether they are revoked."""
    from service.auth.service import list_keys as listed

    with _admin_session() as session:
        for api_key, name in listed(session, tenant_name=tenant):
            state = "revoked" if api_key.revoked_at else "active"
            expires = api_key.expires_at.isoformat() if api_key.expires_at else "never"
            typer.echo(f"{api_key.prefix}\t{name}\t{state}\texpires {expires}")


@contextmanager
def _admin_session() -> Iterator["Session"]:
    """A session on the database of the service these settings describe, which must exist:
    making an empty one here (say, from another directory) would hand out keys that the
    running service has never heard of."""
    from service.context import AppContext

    settings = get_settings()
    typer.echo(f"Database: {_shown_url(settings.resolved_database_url)}", err=True)
    problem = _database_problem(settings)
    if problem is not None:
        typer.echo(problem, err=True)
        raise typer.Exit(1)
    migrate_database(settings)
    with AppContext(settings).db.session() as session:
        yield session


def _shown_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _database_problem(settings: Settings) -> str | None:
    """Why these settings do not point at a thaw database yet, or None when they do."""
    from sqlalchemy import create_engine, inspect
    from sqlalchemy.engine import make_url

    url = make_url(settings.resolved_database_url)
    fix = (
        "Run the command where the service runs (its THAW_DATA_DIR, default ./thaw-data, or "
        "its THAW_DATABASE_URL), or create the database first with `thaw migrate` (or by "
        "starting `thaw serve` once)."
    )
    if url.get_backend_name() == "sqlite" and not Path(url.database or "").is_file():
        return f"No thaw database at {url.database}. {fix}"
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            migrated = inspect(connection).has_table("alembic_version")
    except Exception as exc:
        return f"Cannot reach the database: {exc}"
    finally:
        engine.dispose()
    return None if migrated else f"The database has no thaw tables yet. {fix}"
