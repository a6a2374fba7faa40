"""`thaw`: run the service, a worker, migrations, and manage API keys; and, as a client of a
running server (`--url`/`THAW_URL`, `--api-key`/`THAW_API_KEY`), datasets, jobs, models, predict.
"""

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from service.settings import Settings, get_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

app = typer.Typer(help="thaw: a self-hosted transfer-learning service.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
datasets_app = typer.Typer(help="Upload and inspect datasets (client).", no_args_is_help=True)
jobs_app = typer.Typer(help="Plan, submit, watch and cancel training jobs (client).")
models_app = typer.Typer(help="Registered models: versions, artifacts, aliases (client).")
app.add_typer(datasets_app, name="datasets")
app.add_typer(jobs_app, name="jobs", no_args_is_help=True)
app.add_typer(models_app, name="models", no_args_is_help=True)

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
    """A Celery worker process; `python -m worker` builds thaw's app when it starts."""
    return [
        sys.executable,
        "-m",
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
    from service.queues import this_host_has_cuda

    _setup_logging()
    settings = get_settings()
    # Children must agree on the data folder whatever their working directory.
    os.environ["THAW_DATA_DIR"] = str(settings.data_dir.resolve())
    migrate_database()
    children: list[subprocess.Popen[bytes]] = []
    if workers:
        training_queues = "cpu,gpu" if this_host_has_cuda() else "cpu"
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


def _stop_children(children: list["subprocess.Popen[bytes]"], timeout: float = 20.0) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # A training worker hands its job back after the current step; one busy in a
            # step-less phase (caching features) is killed, and its lease re-queues the job.
            child.kill()


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


# --- client commands: talk to a running server over HTTP -------------------------------------
# Results go to stdout (a table, or JSON with --json); progress and errors go to stderr, so
# `--json` output can be piped straight into another program.

UrlOption = Annotated[
    str, typer.Option("--url", envvar="THAW_URL", help="Server address.", show_default=True)
]
KeyOption = Annotated[
    str | None,
    typer.Option("--api-key", envvar="THAW_API_KEY", help="API key (`thaw keys create`)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
SpecOption = Annotated[
    Path,
    typer.Option(
        "--file", "-f", exists=True, dir_okay=False, help="The transfer spec, YAML or JSON."
    ),
]
DEFAULT_URL = "http://127.0.0.1:8000"
EXIT_FAILED = 1
EXIT_CANCELLED = 2


def _consoles() -> tuple[Any, Any]:
    from rich.console import Console

    return Console(), Console(stderr=True)


@contextmanager
def _client(url: str, api_key: str | None) -> Iterator[Any]:
    """A `ThawClient`; API errors and an unreachable server end the command with a message."""
    import httpx

    from service.client import ThawClient, ThawError

    _, err = _consoles()
    try:
        with ThawClient(url, api_key=api_key) as client:
            yield client
    except ThawError as exc:
        param = f" ({exc.param})" if exc.param else ""
        err.print(
            f"[red]error {exc.status} {exc.code}{param}:[/red] {exc.message}", highlight=False
        )
        raise typer.Exit(EXIT_FAILED) from None
    except httpx.TransportError as exc:
        err.print(f"[red]cannot reach {url}:[/red] {exc}", highlight=False)
        raise typer.Exit(EXIT_FAILED) from None


def _print_json(value: Any) -> None:
    from pydantic import BaseModel

    def plain(item: Any) -> Any:
        return item.model_dump(mode="json") if isinstance(item, BaseModel) else item

    data = [plain(v) for v in value] if isinstance(value, list) else plain(value)
    typer.echo(json.dumps(data, indent=2))


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if cell is None else str(cell) for cell in row))
    _consoles()[0].print(table)


def _listing(
    items: list[Any], *, as_json: bool, title: str, columns: dict[str, Callable[[Any], Any]]
) -> None:
    """A list command's output: JSON for scripts, or a table of the named columns for people."""
    if as_json:
        _print_json(items)
        return
    _table(title, list(columns), [[cell(item) for cell in columns.values()] for item in items])


def _load_spec(path: Path, **overrides: Any) -> dict[str, Any]:
    import yaml

    text = path.read_text()
    try:
        spec = yaml.safe_load(text) if path.suffix in {".yaml", ".yml"} else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise typer.BadParameter(f"{path} is not valid: {exc}", param_hint="--file") from None
    if not isinstance(spec, dict):
        raise typer.BadParameter(f"{path} must hold a mapping", param_hint="--file")
    return {**spec, **{k: v for k, v in overrides.items() if v is not None}}


def _show_dataset(dataset: Any) -> None:
    _table(
        f"dataset {dataset.id}",
        ["field", "value"],
        [
            ["name", dataset.name],
            ["status", dataset.status],
            ["images", dataset.num_images],
            ["classes", len(dataset.classes)],
            ["skipped files", len(dataset.skipped)],
            ["error", dataset.error_message],
        ],
    )
    _table(
        "classes",
        ["class", "train", "val", "total"],
        [[name, c.train, c.val, c.total] for name, c in dataset.class_counts.items()],
    )
    if dataset.skipped:
        _table(
            "skipped",
            ["path", "code", "reason"],
            [[s.path, s.code, s.reason] for s in dataset.skipped],
        )


@datasets_app.command("upload")
def datasets_upload(
    path: Annotated[Path, typer.Argument(exists=True, help="A zip/tar archive or a folder.")],
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    name: Annotated[str | None, typer.Option(help="Default: the file or folder name.")] = None,
    val_fraction: Annotated[float | None, typer.Option(help="Share held out (0.2).")] = None,
    wait: Annotated[bool, typer.Option(help="Wait until it is processed.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Upload a dataset: an archive, or a folder of class sub-folders (zipped on the fly)."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TransferSpeedColumn,
    )

    _, err = _consoles()
    with _client(url, api_key) as client:
        with Progress(
            TextColumn("upload"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=err
        ) as progress:
            task = progress.add_task("upload", total=None)
            dataset = client.upload_dataset(
                path,
                name=name,
                val_fraction=val_fraction,
                on_progress=lambda sent, total: progress.update(task, completed=sent, total=total),
            )
        if wait:
            with Progress(
                TextColumn("processing"),
                BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                console=err,
            ) as progress:
                task = progress.add_task("processing", total=1.0)
                dataset = client.wait_dataset(
                    dataset.id, on_progress=lambda d: progress.update(task, completed=d.progress)
                )
    if as_json:
        _print_json(dataset)
    else:
        _show_dataset(dataset)
    if dataset.status == "failed":
        raise typer.Exit(EXIT_FAILED)


@datasets_app.command("show")
def datasets_show(
    dataset_id: Annotated[str, typer.Argument(metavar="ID")],
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """A dataset: status, per-class counts and skipped files."""
    with _client(url, api_key) as client:
        dataset = client.get_dataset(dataset_id)
    _print_json(dataset) if as_json else _show_dataset(dataset)


@datasets_app.command("ls")
def datasets_ls(
    url: UrlOption = DEFAULT_URL, api_key: KeyOption = None, as_json: JsonOption = False
) -> None:
    """Your datasets."""
    with _client(url, api_key) as client:
        datasets = list(client.list_datasets())
    _listing(
        datasets,
        as_json=as_json,
        title="datasets",
        columns={
            "id": lambda d: d.id,
            "name": lambda d: d.name,
            "status": lambda d: d.status,
            "images": lambda d: d.num_images,
            "classes": lambda d: len(d.classes),
            "skipped": lambda d: len(d.skipped),
            "created": lambda d: f"{d.created_at:%Y-%m-%d %H:%M}",
        },
    )


@jobs_app.command("plan")
def jobs_plan(
    spec_file: SpecOption,
    dataset: Annotated[str | None, typer.Option(help="Overrides the spec's dataset.")] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Preview the resolved plan of a spec: stages, trainable groups and parameters."""
    with _client(url, api_key) as client:
        plan = client.plan(_load_spec(spec_file, dataset=dataset))
    if as_json:
        _print_json(plan)
        return
    _table(
        f"plan: {plan.base_model}, {plan.num_classes} classes",
        ["stage", "epochs", "image size", "trains", "trainable params", "steps"],
        [
            [
                s.name,
                s.epochs,
                s.image_size,
                ", ".join(str(g.get("name", g)) for g in s.trainable_groups),
                f"{s.trainable_parameters:,} / {s.total_parameters:,}",
                s.steps,
            ]
            for s in plan.stages
        ],
    )


def _show_job(job: Any) -> None:
    eta = "" if job.eta_seconds is None else f", ETA {job.eta_seconds:.0f}s"
    _table(
        f"job {job.id}",
        ["field", "value"],
        [
            ["status", job.status],
            ["progress", f"{job.progress:.0%}{eta}"],
            ["model", job.model_name],
            ["base model", job.base_model],
            ["strategy", job.strategy],
            ["dataset", job.dataset_id],
            [
                "stages",
                ", ".join(f"{s['name']} x{s['epochs']}" for s in job.plan.get("stages", [])),
            ],
            ["error", f"{job.error_code}: {job.error_message}" if job.error_code else None],
            ["created", job.created_at],
            ["finished", job.finished_at],
        ],
    )


def _epoch_line(data: dict[str, Any]) -> str:
    return (
        f"{data['stage']} epoch {data['epoch']} (#{data['global_epoch']}): "
        f"train_loss {data['train_loss']:.4f}  val_loss {data['val_loss']:.4f}  "
        f"val_accuracy {data['val_accuracy']:.3f}  {data['seconds']:.1f}s"
    )


def _watch(client: Any, job: Any) -> Any:
    """Follow a job on its event stream with a bar per stage; returns the finished job."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    _, err = _consoles()
    stages = job.plan.get("stages", [])
    with Progress(
        TextColumn("{task.description:<24}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        console=err,
    ) as progress:
        overall = progress.add_task("overall", total=100, info=job.status)
        bars = [
            progress.add_task(f"stage {i + 1}: {s['name']}", total=s["epochs"], info="")
            for i, s in enumerate(stages)
        ]
        for event in client.stream_events(job.id):
            if event.event == "progress":
                eta = event.data["eta_seconds"]
                info = event.data["status"] + ("" if eta is None else f"  ETA {eta:.0f}s")
                progress.update(overall, completed=round(100 * event.data["progress"]), info=info)
            elif event.event == "epoch":
                data = event.data["data"]
                if 0 <= data["stage_index"] < len(bars):
                    progress.update(
                        bars[data["stage_index"]],
                        completed=data["epoch"],
                        info=f"loss {data['train_loss']:.3f}/{data['val_loss']:.3f}  "
                        f"acc {data['val_accuracy']:.3f}",
                    )
                progress.console.print(_epoch_line(data), highlight=False)
            elif event.event == "status":
                status = event.data["data"].get("status")
                progress.update(overall, info=status)
                progress.console.print(f"status: {status}", highlight=False)
    return client.get_job(job.id)


def _exit_for(job: Any) -> None:
    if job.status == "failed":
        raise typer.Exit(EXIT_FAILED)
    if job.status == "cancelled":
        raise typer.Exit(EXIT_CANCELLED)


@jobs_app.command("create")
def jobs_create(
    spec_file: SpecOption,
    dataset: Annotated[str | None, typer.Option(help="Overrides the spec's dataset.")] = None,
    model: Annotated[str | None, typer.Option(help="Overrides the spec's model name.")] = None,
    watch: Annotated[
        bool, typer.Option(help="Follow it live; exit 1 if it fails, 2 if cancelled.")
    ] = False,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Retries return the same job.")
    ] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Submit a training job from a spec file."""
    _, err = _consoles()
    with _client(url, api_key) as client:
        job = client.create_job(
            _load_spec(spec_file, dataset=dataset, model=model), idempotency_key=idempotency_key
        )
        err.print(f"job {job.id} {job.status}", highlight=False)
        if watch:
            try:
                job = _watch(client, job)
            except KeyboardInterrupt:
                err.print(f"stopped watching; the job goes on (thaw jobs cancel {job.id})")
                raise typer.Exit(130) from None
    _print_json(job) if as_json else _show_job(job)
    if watch:
        _exit_for(job)


@jobs_app.command("ls")
def jobs_ls(
    url: UrlOption = DEFAULT_URL, api_key: KeyOption = None, as_json: JsonOption = False
) -> None:
    """Your jobs."""
    with _client(url, api_key) as client:
        jobs = list(client.list_jobs())
    _listing(
        jobs,
        as_json=as_json,
        title="jobs",
        columns={
            "id": lambda j: j.id,
            "status": lambda j: j.status,
            "progress": lambda j: f"{j.progress:.0%}",
            "model": lambda j: j.model_name,
            "base model": lambda j: j.base_model,
            "strategy": lambda j: j.strategy,
            "created": lambda j: f"{j.created_at:%Y-%m-%d %H:%M}",
        },
    )


@jobs_app.command("show")
def jobs_show(
    job_id: Annotated[str, typer.Argument(metavar="ID")],
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """A job: status, progress and ETA, plan, error."""
    with _client(url, api_key) as client:
        job = client.get_job(job_id)
    _print_json(job) if as_json else _show_job(job)


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: Annotated[str, typer.Argument(metavar="ID")],
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Cancel a job (queued: at once; running: between steps)."""
    with _client(url, api_key) as client:
        job = client.cancel_job(job_id)
    _print_json(job) if as_json else _show_job(job)


@jobs_app.command("logs")
def jobs_logs(
    job_id: Annotated[str, typer.Argument(metavar="ID")],
    follow: Annotated[bool, typer.Option("--follow", help="Keep following until it ends.")] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """A job's events: status changes and one line per epoch (JSON lines with --json)."""
    with _client(url, api_key) as client:
        if follow:
            stored = (e.data for e in client.stream_events(job_id) if e.id is not None)
        else:
            stored = (e.model_dump(mode="json") for e in client.list_events(job_id))
        for event in stored:
            if as_json:
                typer.echo(json.dumps(event))
            elif event["kind"] == "epoch":
                typer.echo(f"{event['created_at']}  {_epoch_line(event['data'])}")
            else:
                detail = " ".join(f"{k}={v}" for k, v in event["data"].items())
                typer.echo(f"{event['created_at']}  {event['kind']}: {detail}")


@models_app.command("ls")
def models_ls(
    url: UrlOption = DEFAULT_URL, api_key: KeyOption = None, as_json: JsonOption = False
) -> None:
    """Your registered models."""
    with _client(url, api_key) as client:
        models = list(client.list_models())
    _listing(
        models,
        as_json=as_json,
        title="models",
        columns={
            "name": lambda m: m.name,
            "latest": lambda m: m.latest_version.version if m.latest_version else None,
            "val accuracy": lambda m: m.latest_version.val_accuracy if m.latest_version else None,
            "aliases": lambda m: ", ".join(f"{a}→{v}" for a, v in m.aliases.items()),
            "tags": lambda m: ", ".join(m.tags),
        },
    )


@models_app.command("show")
def models_show(
    ref: Annotated[str, typer.Argument(metavar="NAME[:REF]")],
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """A model's versions, or with :REF (number or alias) one version in detail."""
    from service.client import parse_ref

    name, version_ref = parse_ref(ref)
    with _client(url, api_key) as client:
        if version_ref:
            version = client.get_version(name, version_ref)
            versions = [version]
        else:
            model = client.get_model(name)
            versions = list(client.list_versions(name))
    if as_json:
        _print_json(
            version
            if version_ref
            else {
                "model": model.model_dump(mode="json"),
                "versions": [v.model_dump(mode="json") for v in versions],
            }
        )
        return
    _table(
        f"model {name}",
        [
            "version",
            "aliases",
            "base model",
            "strategy",
            "val accuracy",
            "val loss",
            "job",
            "created",
        ],
        [
            [
                v.version,
                ", ".join(v.aliases),
                v.base_model,
                v.strategy,
                v.metrics.get("val_accuracy"),
                v.metrics.get("val_loss"),
                v.job_id,
                f"{v.created_at:%Y-%m-%d %H:%M}",
            ]
            for v in versions
        ],
    )


@models_app.command("download")
def models_download(
    ref: Annotated[str, typer.Argument(metavar="NAME[:REF]")],
    artifact: Annotated[
        str | None, typer.Option(help="One artifact (e.g. model.onnx); default: all of them.")
    ] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write to.")] = Path("."),
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Download a version's artifacts (latest version without :REF)."""
    from service.client import parse_ref

    name, version_ref = parse_ref(ref)
    output.mkdir(parents=True, exist_ok=True)
    with _client(url, api_key) as client:
        version = client.get_version(name, version_ref)
        names = [artifact] if artifact else [a.name for a in version.artifacts]
        paths = [
            client.download_artifact(name, str(version.version), item, output / item)
            for item in names
        ]
    if as_json:
        _print_json({"model": name, "version": version.version, "files": [str(p) for p in paths]})
    else:
        _table(
            f"{name} v{version.version}", ["file", "bytes"], [[p, p.stat().st_size] for p in paths]
        )


@models_app.command("alias")
def models_alias(
    name: Annotated[str, typer.Argument()],
    alias: Annotated[str, typer.Argument(help="e.g. production")],
    version: Annotated[int, typer.Argument(help="The version number it points at.")],
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Point an alias at a version (creating or moving it)."""
    with _client(url, api_key) as client:
        result = client.set_alias(name, alias, version)
    if as_json:
        _print_json(result)
    else:
        typer.echo(f"{result.model}:{result.alias} → version {result.version}")


@app.command()
def predict(
    ref: Annotated[str, typer.Argument(metavar="MODEL[:REF]")],
    images: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False, metavar="IMAGE...")],
    top_k: Annotated[int, typer.Option(min=1, max=100, help="Labels per image.")] = 3,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Classify images with a model version (latest without :REF) (client)."""
    from service.client import parse_ref

    name, version_ref = parse_ref(ref)
    with _client(url, api_key) as client:
        answer = client.predict(name, version_ref, images, top_k=top_k)
    if as_json:
        _print_json(answer)
        return
    _table(
        f"{answer.model} v{answer.version}",
        ["image", "label", "probability", "others"],
        [
            [
                p.image,
                p.top[0].label,
                f"{p.top[0].probability:.3f}",
                ", ".join(f"{t.label} {t.probability:.3f}" for t in p.top[1:]),
            ]
            if p.top
            else [p.image, "error", None, f"{p.error.code}: {p.error.message}" if p.error else None]
            for p in answer.predictions
        ],
    )


if __name__ == "__main__":
    app()
