"""Client commands for registered models: ls, show, monitor, download, export, alias."""

import time
from pathlib import Path
from typing import Annotated

import typer

from service.cli.client import (
    DEFAULT_URL,
    JsonOption,
    KeyOption,
    UrlOption,
    client_session,
    listing,
    print_json,
    table,
)

models_app = typer.Typer(help="Registered models: versions, artifacts, aliases (client).")


@models_app.command("ls")
def models_ls(
    url: UrlOption = DEFAULT_URL, api_key: KeyOption = None, as_json: JsonOption = False
) -> None:
    """Your registered models."""
    with client_session(url, api_key) as client:
        models = list(client.list_models())
    listing(
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
    with client_session(url, api_key) as client:
        if version_ref:
            version = client.get_version(name, version_ref)
            versions = [version]
        else:
            model = client.get_model(name)
            versions = list(client.list_versions(name))
    if as_json:
        print_json(
            version
            if version_ref
            else {
                "model": model.model_dump(mode="json"),
                "versions": [v.model_dump(mode="json") for v in versions],
            }
        )
        return
    table(
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


def _rate(value: float | None) -> str | None:
    return None if value is None else f"{value:.3f}"


@models_app.command("monitor")
def models_monitor(
    ref: Annotated[str, typer.Argument(metavar="NAME:REF")],
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    as_json: JsonOption = False,
    limit: Annotated[int, typer.Option(help="The latest windows shown.")] = 20,
    every: Annotated[
        float, typer.Option(help="Seconds between refreshes; 0 prints once.", min=0)
    ] = 0,
) -> None:
    """A version's predict traffic, window by window: shift test, estimated and observed
    accuracy; with --every, printed again as windows close (Ctrl-C ends it)."""
    from service.client import parse_ref

    name, version_ref = parse_ref(ref)
    with client_session(url, api_key) as client:
        version = client.resolve_ref(name, version_ref)
        while True:
            shown = client.get_monitoring(name, version, limit=limit)
            if as_json:
                print_json(shown)
            else:
                table(
                    f"{name} v{shown.version}: "
                    + (
                        f"validation accuracy {_rate(shown.validation_accuracy)}, "
                        f"significance {shown.significance}"
                        if shown.reference
                        else f"no reference profile ({shown.reason})"
                    ),
                    ["window", "end", "count", "score", "p", "shifted", "estimated", "observed"],
                    [
                        [
                            w.seq,
                            f"{w.end:%Y-%m-%d %H:%M:%S}",
                            w.count,
                            None if w.score is None else f"{w.score:.4f}",
                            None if w.p_value is None else f"{w.p_value:.3f}",
                            "SHIFTED" if w.shifted else ("no" if w.shifted is False else None),
                            _rate(w.estimated_accuracy),
                            _rate(w.observed_accuracy),
                        ]
                        for w in shown.windows
                    ],
                )
            if not every:
                return
            time.sleep(every)


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
    with client_session(url, api_key) as client:
        version = client.get_version(name, version_ref)
        names = [artifact] if artifact else [a.name for a in version.artifacts]
        paths = [
            client.download_artifact(name, str(version.version), item, output / item)
            for item in names
        ]
    if as_json:
        print_json({"model": name, "version": version.version, "files": [str(p) for p in paths]})
    else:
        table(
            f"{name} v{version.version}", ["file", "bytes"], [[p, p.stat().st_size] for p in paths]
        )


@models_app.command("export")
def models_export(
    ref: Annotated[str, typer.Argument(metavar="NAME[:REF]")],
    export_format: Annotated[
        str, typer.Option("--format", help="triton, mlflow or hf (text versions).")
    ],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="The zip to write.")] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Export a version for another serving stack, as a zip (latest version without :REF)."""
    from service.client import parse_ref

    name, version_ref = parse_ref(ref)
    with client_session(url, api_key) as client:
        version = client.get_version(name, version_ref)
        target = output or Path(f"{name}-v{version.version}-{export_format}.zip")
        path = client.download_export(name, str(version.version), export_format, target)
    if as_json:
        print_json({"model": name, "version": version.version, "file": str(path)})
    else:
        table(f"{name} v{version.version}", ["file", "bytes"], [[path, path.stat().st_size]])


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
    with client_session(url, api_key) as client:
        result = client.set_alias(name, alias, version)
    if as_json:
        print_json(result)
    else:
        typer.echo(f"{result.model}:{result.alias} → version {result.version}")
