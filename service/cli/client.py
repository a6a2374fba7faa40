"""What every client command shares: talking to a running server over HTTP and printing results.

Results go to stdout (a table, or JSON with --json); progress and errors go to stderr, so
`--json` output can be piped straight into another program.
"""

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

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


def consoles() -> tuple[Any, Any]:
    from rich.console import Console

    return Console(), Console(stderr=True)


@contextmanager
def client_session(url: str, api_key: str | None) -> Iterator[Any]:
    """A `ThawClient`; API errors and an unreachable server end the command with a message."""
    import httpx

    from service.client import ThawClient, ThawError

    _, err = consoles()
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


def print_json(value: Any) -> None:
    from pydantic import BaseModel

    def plain(item: Any) -> Any:
        return item.model_dump(mode="json") if isinstance(item, BaseModel) else item

    data = [plain(v) for v in value] if isinstance(value, list) else plain(value)
    typer.echo(json.dumps(data, indent=2))


def table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if cell is None else str(cell) for cell in row))
    consoles()[0].print(table)


def listing(
    items: list[Any], *, as_json: bool, title: str, columns: dict[str, Callable[[Any], Any]]
) -> None:
    """A list command's output: JSON for scripts, or a table of the named columns for people."""
    if as_json:
        print_json(items)
        return
    table(title, list(columns), [[cell(item) for cell in columns.values()] for item in items])


def load_spec(path: Path, **overrides: Any) -> dict[str, Any]:
    import yaml

    text = path.read_text()
    try:
        spec = yaml.safe_load(text) if path.suffix in {".yaml", ".yml"} else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise typer.BadParameter(f"{path} is not valid: {exc}", param_hint="--file") from None
    if not isinstance(spec, dict):
        raise typer.BadParameter(f"{path} must hold a mapping", param_hint="--file")
    return {**spec, **{k: v for k, v in overrides.items() if v is not None}}
