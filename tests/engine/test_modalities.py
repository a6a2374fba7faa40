"""The modalities are plug-ins: found by name or base model, never compared by name elsewhere."""

import re
from pathlib import Path

import pytest

from worker.engine.modalities import (
    MODALITIES,
    UnknownModalityError,
    modality_for,
    modality_of_base_model,
    upload_modality,
)
from worker.engine.strategies import STRATEGIES
from worker.engine.zoo import UnknownBaseModelError

ROOT = Path(__file__).resolve().parents[2]
NAME_BRANCH = re.compile(r"""modality *==|is_text|== *"text"|== *"image\"""")
ALLOWED: dict[str, int] = {}


def test_a_modality_is_found_by_its_name_and_an_unknown_name_is_refused() -> None:
    for modality in MODALITIES:
        assert modality_for(modality.name) is modality
    with pytest.raises(UnknownModalityError, match=r"unknown modality 'audio'; known: image, text"):
        modality_for("audio")


def test_a_base_model_belongs_to_the_modality_whose_zoo_holds_it() -> None:
    assert modality_of_base_model("resnet18").name == "image"
    assert modality_of_base_model("timm:resnet18").name == "image"
    assert modality_of_base_model("minilm_l6").name == "text"
    assert modality_of_base_model("hf:some-folder").name == "text"
    with pytest.raises(UnknownBaseModelError, match="unknown base model 'nope'; known: "):
        modality_of_base_model("nope")


def test_an_upload_kind_only_one_modality_takes_decides_the_modality_before_ingestion() -> None:
    # An archive holds label folders of images or of .txt files: ingestion tells which.
    taken = {
        kind: getattr(upload_modality(kind), "name", None) for kind in ("archive", "csv", "jsonl")
    }
    assert taken == {"archive": None, "csv": "text", "jsonl": "text"}


def test_every_strategy_has_a_modality_that_trains_its_objectives() -> None:
    for strategy in STRATEGIES.values():
        takers = [m.name for m in MODALITIES if strategy.objectives <= m.objectives]
        assert takers == (["text"] if strategy.name == "ulmfit" else ["image", "text"])


def test_no_code_outside_the_modalities_branches_on_a_modality_name() -> None:
    found: dict[str, int] = {}
    for folder in ("service", "worker"):
        for path in sorted((ROOT / folder).rglob("*")):
            where = path.relative_to(ROOT).as_posix()
            if path.suffix not in {".py", ".html"} or where.startswith("worker/engine/modalities/"):
                continue
            hits = sum(1 for line in path.read_text().splitlines() if NAME_BRANCH.search(line))
            if hits:
                found[where] = hits
    assert found == ALLOWED
