"""`thaw`: run the service, a worker, migrations, and manage API keys."""

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from service.settings import Settings, get_settings

app = typer.Typer(help="thaw: a self-hosted transfer-learning service.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


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


@app.command()
def migrate() -> None:
    """Bring the database schema up to date (`alembic upgrade head`)."""
    _setup_logging()
    migrate_database()


def worker_command(queues: str, *, name: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "--app",
        "worker.celery_app",
        "worker",
        "--queues",
        queues,
        "--pool",
        "solo",
        "--hostname",
        f"{name}@%h",
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        "INFO",
    ]


@app.command()
def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated queues: cpu, gpu, datasets.")] = (
        "cpu,datasets"
    ),
    name: Annotated[str, typer.Option(help="Worker name.")] = "worker",
) -> None:
    """Run a Celery worker (one task at a time; run more processes to scale)."""
    os.execv(sys.executable, worker_command(queues, name=name))


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[bool, typer.Option(help="Also start the worker processes.")] = True,
) -> None:
    """Run the API, a training worker and a dataset worker on this machine.

    With no configuration everything lives under THAW_DATA_DIR (default ./thaw-data): SQLite, the
    artifact folder and a folder broker, so stopping and starting again loses nothing.
    """
    import uvicorn

    from service.jobs.reaper import resend_pending
    from service.main import create_app

    _setup_logging()
    settings = get_settings()
    # Children must agree on the data folder whatever their working directory.
    os.environ["THAW_DATA_DIR"] = str(settings.data_dir.resolve())
    migrate_database()
    children: list[subprocess.Popen[bytes]] = []
    if workers:
        training_queues = "cpu,gpu" if _cuda_available() else "cpu"
        children = [
            subprocess.Popen(worker_command(training_queues, name="train")),
            subprocess.Popen(worker_command("datasets", name="datasets")),
        ]
    application = create_app()
    resend_pending(application.state.context)
    try:
        uvicorn.run(application, host=host, port=port, log_level="info")
    finally:
        _stop_children(children)


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _stop_children(children: list["subprocess.Popen[bytes]"], timeout: float = 20.0) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # A training task can outlast any wait: its job is re-queued from its lease.
            child.kill()


@keys_app.command("create")
def create_key(
    tenant: Annotated[str, typer.Option(help="Team name; created if new.")],
) -> None:
    """Create an API key for a tenant. The key is printed once, alone on the last line."""
    from service.auth.service import create_key as create
    from service.context import AppContext

    migrate_database()
    context = AppContext(get_settings())
    with context.db.session() as session:
        api_key, plaintext = create(session, tenant_name=tenant)
        typer.echo(
            f"Created key {api_key.prefix}… for tenant {tenant!r}. It is shown only once:", err=True
        )
    typer.echo(plaintext)


if __name__ == "__main__":
    app()
