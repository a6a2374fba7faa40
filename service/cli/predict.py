"""Client command `predict`: classify files with a model version."""

from pathlib import Path
from typing import Annotated

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
    with client_session(url, api_key) as client:
        answer = client.predict(name, version_ref, images, top_k=top_k)
    if as_json:
        print_json(answer)
        return
    table(
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
