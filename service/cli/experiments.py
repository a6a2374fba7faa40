"""Client commands for experiments: create (and watch a live leaderboard), show, ls, cancel,
promote."""

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from service.cli.client import (
    DEFAULT_URL,
    EXIT_CANCELLED,
    EXIT_FAILED,
    JsonOption,
    KeyOption,
    UrlOption,
    client_session,
    consoles,
    listing,
    load_spec,
    print_json,
    table,
)
from service.jobs.schemas import PARENT_PREFIX
from service.jobs.states import TERMINAL_STATUSES, ExperimentStatus

experiments_app = typer.Typer(
    help="Compare base models and strategies on one dataset: leaderboard, diagnosis (client)."
)

ExperimentFile = Annotated[
    Path,
    typer.Option(
        "--file",
        "-f",
        exists=True,
        dir_okay=False,
        help="The experiment, YAML or JSON: dataset, model, base_models, strategies, settings, "
        "seeds, test_fraction, budget.",
    ),
]
WATCH_SECONDS = 2.0


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def _from_registered_model(experiment: Any) -> bool:
    """Whether a base model is a registered model (a parent): its trials have old-task columns."""
    return any(str(name).startswith(PARENT_PREFIX) for name in experiment.request["base_models"])


def _signed_points(value: float | None) -> str:
    return "" if value is None else f"{100 * value:+.1f}"


def _leaderboard(experiment: Any) -> Any:
    from rich.table import Table

    done = sum(1 for t in experiment.trials if t.status in TERMINAL_STATUSES)
    board = Table(
        title=f"experiment {experiment.id}: {experiment.status}, {done}/{len(experiment.trials)} "
        f"trials ended, test split {experiment.test_size} items"
    )
    columns = [
        "#",
        "base model",
        "strategy",
        "seed",
        "status",
        "val acc %",
        "test acc % (95 % interval)",
        "test loss",
        "macro F1",
        "best epoch",
        "wall s",
        "trainable / total params",
        "weights MB",
        "ms/item",
        "version",
    ]
    old_task = _from_registered_model(experiment)
    if old_task:
        columns[-1:-1] = ["old-task acc %", "old-task change (points)"]
    for column in columns:
        board.add_column(column)
    for row in experiment.leaderboard:
        interval = row.test_accuracy_interval
        cells = [
            str(row.rank),
            row.base_model,
            row.strategy,
            str(row.seed),
            row.status,
            _percent(row.val_accuracy),
            _percent(row.test_accuracy)
            + ("" if not interval else f" ({_percent(interval[0])} to {_percent(interval[1])})"),
            "" if row.test_loss is None else f"{row.test_loss:.3f}",
            "" if row.test_macro_f1 is None else f"{row.test_macro_f1:.3f}",
            "" if row.epochs_to_best is None else str(row.epochs_to_best),
            "" if row.wall_seconds is None else f"{row.wall_seconds:.1f}",
            f"{row.trainable_parameters:,} / {row.total_parameters:,}",
            "" if row.artifact_bytes is None else f"{row.artifact_bytes / 1e6:.1f}",
            "" if row.latency_ms_per_item is None else f"{row.latency_ms_per_item:.1f}",
            "" if row.version is None else f"{row.model}:{row.version}",
        ]
        if old_task:
            cells[-1:-1] = [_percent(row.old_task_accuracy), _signed_points(row.old_task_change)]
        board.add_row(*cells)
    return board


def _show(experiment: Any) -> None:
    out, _ = consoles()
    out.print(_leaderboard(experiment))
    if experiment.diagnosis.get("summary"):
        table("diagnosis", ["finding"], [[line] for line in experiment.diagnosis["summary"]])


def _watch(client: Any, experiment: Any) -> Any:
    """Redraw the leaderboard every few seconds until the experiment ends; returns it."""
    from rich.live import Live

    _, err = consoles()
    with Live(_leaderboard(experiment), console=err, refresh_per_second=4) as live:
        while experiment.status == ExperimentStatus.RUNNING:
            time.sleep(WATCH_SECONDS)
            experiment = client.get_experiment(experiment.id)
            live.update(_leaderboard(experiment))
    return experiment


def _exit_for(experiment: Any) -> None:
    if experiment.status == ExperimentStatus.FAILED:
        raise typer.Exit(EXIT_FAILED)
    if experiment.status == ExperimentStatus.CANCELLED:
        raise typer.Exit(EXIT_CANCELLED)


@experiments_app.command("create")
def experiments_create(
    spec_file: ExperimentFile,
    dataset: Annotated[str | None, typer.Option(help="Overrides the file's dataset.")] = None,
    model: Annotated[str | None, typer.Option(help="Overrides the file's model name.")] = None,
    watch: Annotated[
        bool,
        typer.Option(help="A live leaderboard until it ends; exit 1 if it failed, 2 if cancelled."),
    ] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Start an experiment from a file."""
    _, err = consoles()
    with client_session(url, api_key) as client:
        experiment = client.create_experiment(load_spec(spec_file, dataset=dataset, model=model))
        err.print(f"experiment {experiment.id}: {len(experiment.trials)} trials", highlight=False)
        if watch:
            try:
                experiment = _watch(client, experiment)
            except KeyboardInterrupt:
                err.print(f"stopped watching; it goes on (thaw experiments cancel {experiment.id})")
                raise typer.Exit(130) from None
    print_json(experiment) if as_json else _show(experiment)
    if watch:
        _exit_for(experiment)


@experiments_app.command("show")
def experiments_show(
    experiment_id: Annotated[str, typer.Argument(metavar="ID")],
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """An experiment's leaderboard and diagnosis."""
    with client_session(url, api_key) as client:
        experiment = client.get_experiment(experiment_id)
    print_json(experiment) if as_json else _show(experiment)


@experiments_app.command("ls")
def experiments_ls(
    url: UrlOption = DEFAULT_URL, api_key: KeyOption = None, as_json: JsonOption = False
) -> None:
    """Your experiments."""
    with client_session(url, api_key) as client:
        experiments = list(client.list_experiments())
    listing(
        experiments,
        as_json=as_json,
        title="experiments",
        columns={
            "id": lambda e: e.id,
            "status": lambda e: e.status,
            "model": lambda e: e.model_name,
            "dataset": lambda e: e.dataset_id,
            "test items": lambda e: e.test_size,
            "created": lambda e: f"{e.created_at:%Y-%m-%d %H:%M}",
        },
    )


@experiments_app.command("cancel")
def experiments_cancel(
    experiment_id: Annotated[str, typer.Argument(metavar="ID")],
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Cancel every trial of an experiment."""
    with client_session(url, api_key) as client:
        experiment = client.cancel_experiment(experiment_id)
    print_json(experiment) if as_json else _show(experiment)


@experiments_app.command("promote")
def experiments_promote(
    experiment_id: Annotated[str, typer.Argument(metavar="ID")],
    trial: Annotated[str | None, typer.Option(help="A trial id; default: the leader.")] = None,
    alias: Annotated[str, typer.Option(help="The alias to point.")] = "production",
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Point an alias at a trial's version (default: the leader's)."""
    with client_session(url, api_key) as client:
        result = client.promote_experiment(experiment_id, trial=trial, alias=alias)
    if as_json:
        print_json(result)
    else:
        typer.echo(f"{result.model}:{result.alias} → version {result.version} ({result.trial_id})")
