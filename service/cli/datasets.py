"""Client commands for datasets: upload, show, ls."""

from pathlib import Path
from typing import Annotated, Any

import typer

from service.cli.client import (
    DEFAULT_URL,
    EXIT_FAILED,
    JsonOption,
    KeyOption,
    UrlOption,
    client_session,
    consoles,
    listing,
    print_json,
    table,
)
from worker.engine.modalities import dataset_modality

datasets_app = typer.Typer(help="Upload and inspect datasets (client).", no_args_is_help=True)


def _show_dataset(dataset: Any) -> None:
    modality = dataset_modality(dataset.modality)
    table(
        f"dataset {dataset.id}",
        ["field", "value"],
        [
            ["name", dataset.name],
            ["status", dataset.status],
            ["modality", dataset.modality],
            *modality.sizes(dataset),
            ["classes", len(dataset.classes)],
            [f"skipped {modality.skipped_items}", dataset.num_skipped],
            ["error", dataset.error_message],
        ],
    )
    table(
        "classes",
        ["class", "train", "val", "total"],
        [[name, c.train, c.val, c.total] for name, c in dataset.class_counts.items()],
    )
    if (lengths := dataset.token_lengths) is not None:
        table(
            f"token lengths ({lengths.base_model}, maximum {lengths.max_length})",
            ["texts", "mean", "median", "95%", "max", "would be truncated"],
            [
                [
                    lengths.texts,
                    lengths.mean,
                    lengths.median,
                    lengths.p95,
                    lengths.max,
                    lengths.truncated,
                ]
            ],
        )
    if dataset.skipped:
        table(
            "skipped",
            ["where", "code", "reason"],
            [
                [f"line {s.line}" if s.line is not None else s.path, s.code, s.reason]
                for s in dataset.skipped
            ],
        )


@datasets_app.command("upload")
def datasets_upload(
    path: Annotated[
        Path,
        typer.Argument(
            exists=True,
            help="Images: a zip/tar archive or a folder of class folders. Texts: a CSV with a "
            "header, JSON Lines, or a zip/tar of one folder of .txt files per class.",
        ),
    ],
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    name: Annotated[str | None, typer.Option(help="Default: the file or folder name.")] = None,
    val_fraction: Annotated[float | None, typer.Option(help="Share held out (0.2).")] = None,
    text_column: Annotated[
        str | None, typer.Option(help="CSV / JSON Lines: the field holding the text (text).")
    ] = None,
    label_column: Annotated[
        str | None, typer.Option(help="CSV / JSON Lines: the field holding the label (label).")
    ] = None,
    wait: Annotated[bool, typer.Option(help="Wait until it is processed.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Upload a dataset: an archive, a folder of class sub-folders (zipped on the fly), or a
    CSV / JSON Lines file of texts."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TransferSpeedColumn,
    )

    _, err = consoles()
    with client_session(url, api_key) as client:
        with Progress(
            TextColumn("upload"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=err
        ) as progress:
            task = progress.add_task("upload", total=None)
            dataset = client.upload_dataset(
                path,
                name=name,
                val_fraction=val_fraction,
                text_column=text_column,
                label_column=label_column,
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
        print_json(dataset)
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
    with client_session(url, api_key) as client:
        dataset = client.get_dataset(dataset_id)
    print_json(dataset) if as_json else _show_dataset(dataset)


@datasets_app.command("ls")
def datasets_ls(
    url: UrlOption = DEFAULT_URL, api_key: KeyOption = None, as_json: JsonOption = False
) -> None:
    """Your datasets."""
    with client_session(url, api_key) as client:
        datasets = list(client.list_datasets())
    listing(
        datasets,
        as_json=as_json,
        title="datasets",
        columns={
            "id": lambda d: d.id,
            "name": lambda d: d.name,
            "status": lambda d: d.status,
            "modality": lambda d: d.modality,
            "samples": lambda d: d.num_labelled,
            "classes": lambda d: len(d.classes),
            "skipped": lambda d: d.num_skipped,
            "created": lambda d: f"{d.created_at:%Y-%m-%d %H:%M}",
        },
    )
