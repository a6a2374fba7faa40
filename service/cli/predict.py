"""Client command `predict`: classify images or texts with a model version."""

from pathlib import Path
from typing import Annotated, Any

import typer

from service.cli.client import (
    DEFAULT_URL,
    JsonOption,
    KeyOption,
    UrlOption,
    client_session,
    print_json,
    table,
)
from worker.engine.modalities import modality_for
from worker.engine.stages import Plan

_SHOWN_CHARS = 60


def predict(
    ref: Annotated[str, typer.Argument(metavar="MODEL[:REF]")],
    inputs: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="IMAGE... | TEXT...",
            help="Image files for an image model; strings for a text model.",
            show_default=False,
        ),
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            exists=True,
            dir_okay=False,
            help="Text models: a UTF-8 file with one text per line.",
        ),
    ] = None,
    top_k: Annotated[int, typer.Option(min=1, max=100, help="Labels per input.")] = 3,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Classify images or texts with a model version (latest without :REF) (client)."""
    from service.client import parse_ref

    name, version_ref = parse_ref(ref)
    given = list(inputs or [])
    with client_session(url, api_key) as client:
        version = client.get_version(name, version_ref)
        number = str(version.version)
        if modality_for(Plan.from_dict(version.plan).modality).inline_items:
            texts = given + (_lines(file) if file is not None else [])
            if not texts:
                raise typer.BadParameter("give texts, or --file with one text per line")
            answer = client.predict_texts(name, number, texts, top_k=top_k)
            shown = [_shorten(text) for text in texts]
        else:
            if file is not None:
                raise typer.BadParameter(
                    f"{name} v{number} is an image model; --file is for texts",
                    param_hint="--file",
                )
            images = [Path(item) for item in given]
            if not images or (missing := [str(p) for p in images if not p.is_file()]):
                raise typer.BadParameter(
                    f"{name} v{number} is an image model; give image files "
                    f"(not found: {', '.join(missing) if images else 'none given'})",
                    param_hint="IMAGE...",
                )
            answer = client.predict(name, number, images, top_k=top_k)
            shown = [image.name for image in images]
    if as_json:
        print_json(answer)
        return
    table(
        f"{answer.model} v{answer.version}",
        ["input", "label", "probability", "others"],
        [_row(shown[index], p) for index, p in enumerate(answer.predictions)],
    )


def _lines(path: Path) -> list[str]:
    with path.open(encoding="utf-8-sig") as handle:
        return [line.rstrip("\r\n") for line in handle if line.strip()]


def _shorten(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _SHOWN_CHARS else flat[: _SHOWN_CHARS - 1] + "…"


def _row(shown: str, prediction: Any) -> list[Any]:
    if prediction.top:
        top = prediction.top
        others = ", ".join(f"{t.label} {t.probability:.3f}" for t in top[1:])
        return [shown, top[0].label, f"{top[0].probability:.3f}", others]
    error = prediction.error
    return [shown, "error", None, f"{error.code}: {error.message}" if error else None]
