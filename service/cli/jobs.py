"""Client commands for training jobs: plan, create (and watch), lr-find, ls, show, cancel, logs."""

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer

from service.cli.client import (
    DEFAULT_URL,
    EXIT_CANCELLED,
    EXIT_FAILED,
    JsonOption,
    KeyOption,
    SpecOption,
    UrlOption,
    client_session,
    consoles,
    listing,
    load_spec,
    print_json,
    table,
)
from worker.engine.stages import Plan

jobs_app = typer.Typer(help="Plan, submit, watch and cancel training jobs (client).")


@jobs_app.command("plan")
def jobs_plan(
    spec_file: SpecOption,
    dataset: Annotated[str | None, typer.Option(help="Overrides the spec's dataset.")] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Preview the resolved plan of a spec: stages, trainable groups and parameters."""
    with client_session(url, api_key) as client:
        plan = client.plan(load_spec(spec_file, dataset=dataset))
    if as_json:
        print_json(plan)
        return
    table(
        f"plan: {plan.base_model}, {plan.num_classes} classes",
        ["stage", "epochs", "reads", "trains", "trainable params", "steps"],
        [
            [
                s.name,
                s.epochs,
                s.reads,
                ", ".join(str(g.get("name", g)) for g in s.trainable_groups),
                f"{s.trainable_parameters:,} / {s.total_parameters:,}",
                s.steps,
            ]
            for s in plan.stages
        ],
    )


def _show_job(job: Any) -> None:
    eta = "" if job.eta_seconds is None else f", ETA {job.eta_seconds:.0f}s"
    table(
        f"job {job.id}",
        ["field", "value"],
        [
            ["kind", job.kind],
            ["status", job.status],
            ["progress", f"{job.progress:.0%}{eta}"],
            ["model", job.model_name],
            ["base model", job.base_model],
            ["strategy", job.strategy],
            ["dataset", job.dataset_id],
            [
                "stages",
                ", ".join(f"{s.name} x{s.epochs}" for s in Plan.from_dict(job.plan).stages),
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

    _, err = consoles()
    stages = Plan.from_dict(job.plan).stages
    with Progress(
        TextColumn("{task.description:<24}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        console=err,
    ) as progress:
        overall = progress.add_task("overall", total=100, info=job.status)
        bars = [
            progress.add_task(f"stage {i + 1}: {s.name}", total=s.epochs, info="")
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
    _, err = consoles()
    with client_session(url, api_key) as client:
        job = client.create_job(
            load_spec(spec_file, dataset=dataset, model=model), idempotency_key=idempotency_key
        )
        err.print(f"job {job.id} {job.status}", highlight=False)
        if watch:
            try:
                job = _watch(client, job)
            except KeyboardInterrupt:
                err.print(f"stopped watching; the job goes on (thaw jobs cancel {job.id})")
                raise typer.Exit(130) from None
    print_json(job) if as_json else _show_job(job)
    if watch:
        _exit_for(job)


CURVE_ROWS = 12
CURVE_COLUMNS = 60


def curve_text(lrs: list[float], losses: list[float], suggestion_index: int) -> str:
    """The loss against the rate (log scale) as plain text: one `*` per column's mean loss,
    `v` above the suggestion's column."""
    columns = min(CURVE_COLUMNS, len(lrs))
    low, high = math.log10(lrs[0]), math.log10(lrs[-1])

    def column_of(rate: float) -> int:
        if high == low:
            return 0
        return min(columns - 1, int((math.log10(rate) - low) / (high - low) * columns))

    per_column: dict[int, list[float]] = {}
    for rate, loss in zip(lrs, losses, strict=True):
        per_column.setdefault(column_of(rate), []).append(loss)
    means = {column: sum(values) / len(values) for column, values in per_column.items()}
    bottom, top = min(means.values()), max(means.values())
    span = top - bottom or 1.0
    grid = [[" "] * columns for _ in range(CURVE_ROWS)]
    for column, mean in means.items():
        grid[round((top - mean) / span * (CURVE_ROWS - 1))][column] = "*"
    marker = [" "] * columns
    marker[column_of(lrs[suggestion_index])] = "v"
    lines = ["".join(marker).rstrip()]
    for index, row in enumerate(grid):
        label = f"{top - index * span / (CURVE_ROWS - 1):8.3f} |"
        lines.append(label + "".join(row).rstrip())
    lines.append(" " * 9 + "+" + "-" * columns)
    left, right = f"{lrs[0]:.0e}", f"{lrs[-1]:.0e}"
    lines.append(" " * 10 + left + right.rjust(columns - len(left)))
    return "\n".join(lines)


@jobs_app.command("lr-find")
def jobs_lr_find(
    spec_file: SpecOption,
    dataset: Annotated[str | None, typer.Option(help="Overrides the spec's dataset.")] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Save the curve as an SVG file here.")
    ] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Run the learning-rate finder on a spec's first stage, wait for it, and draw the loss
    against the rate in the terminal (or save the plot with --plot). Exit 1 if it fails, 2 if
    cancelled."""
    _, err = consoles()
    with client_session(url, api_key) as client:
        job = client.create_lr_find_job(load_spec(spec_file, dataset=dataset))
        err.print(f"job {job.id} {job.status}", highlight=False)
        try:
            for event in client.stream_events(job.id):
                if event.event == "status":
                    err.print(f"status: {event.data['data'].get('status')}", highlight=False)
        except KeyboardInterrupt:
            err.print(f"stopped waiting; the job goes on (thaw jobs cancel {job.id})")
            raise typer.Exit(130) from None
        job = client.get_job(job.id)
        if job.status != "succeeded":
            _show_job(job)
            _exit_for(job)
        finding = client.lr_finding(job.id)
        if plot is not None:
            plot.write_bytes(client.lr_find_plot(job.id))
            err.print(f"saved the plot to {plot}", highlight=False)
    if as_json:
        print_json(finding)
        return
    if plot is None:
        typer.echo(curve_text(finding.lrs, finding.losses, finding.suggestion_index))
    rate = f"{finding.lr:.2e}" if finding.lr is not None else "(the stage does not follow lr)"
    typer.echo(
        f"suggested rate for stage {finding.stage}: {finding.suggestion:.2e}; spec lr: {rate}"
        + ("  (the loss diverged at the end of the curve)" if finding.diverged else "")
    )


@jobs_app.command("ls")
def jobs_ls(
    url: UrlOption = DEFAULT_URL, api_key: KeyOption = None, as_json: JsonOption = False
) -> None:
    """Your jobs."""
    with client_session(url, api_key) as client:
        jobs = list(client.list_jobs())
    listing(
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
    with client_session(url, api_key) as client:
        job = client.get_job(job_id)
    print_json(job) if as_json else _show_job(job)


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: Annotated[str, typer.Argument(metavar="ID")],
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Cancel a job (queued: at once; running: between steps)."""
    with client_session(url, api_key) as client:
        job = client.cancel_job(job_id)
    print_json(job) if as_json else _show_job(job)


@jobs_app.command("logs")
def jobs_logs(
    job_id: Annotated[str, typer.Argument(metavar="ID")],
    follow: Annotated[bool, typer.Option("--follow", help="Keep following until it ends.")] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """A job's events: status changes and one line per epoch (JSON lines with --json)."""
    with client_session(url, api_key) as client:
        if follow:
            stored = (e.data for e in client.stream_events(job_id) if e.id is not None)
        else:
            stored = (e.model_dump(mode="json") for e in client.list_events(job_id))
        for event in stored:
            if as_json:
                typer.echo(json.dumps(event))
            elif event["kind"] == "epoch":
                typer.echo(f"{event['created_at']}  {_epoch_line(event['data'])}")
            elif event["kind"] == "lr_find":
                # The curve is long; `thaw jobs lr-find` or the /lr-find route draws it.
                found = event["data"]
                typer.echo(
                    f"{event['created_at']}  lr_find: stage {found['stage']}, "
                    f"{len(found['lrs'])} steps, suggestion {found['suggestion']:.2e}, "
                    f"lr {found['lr']}"
                )
            else:
                detail = " ".join(f"{k}={v}" for k, v in event["data"].items())
                typer.echo(f"{event['created_at']}  {event['kind']}: {detail}")
