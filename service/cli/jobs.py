"""Client commands for training jobs: plan, create (and watch), ls, show, cancel, logs."""

import json
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
    table(
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

    _, err = consoles()
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
            else:
                detail = " ".join(f"{k}={v}" for k, v in event["data"].items())
                typer.echo(f"{event['created_at']}  {event['kind']}: {detail}")
