"""Client commands for registered models: ls, show, download, export, alias."""

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
