"""An experiment's test split: carved once, seeded and stratified, out of the dataset's samples,
and kept in storage as the list of the held-out items' ids (`service.datasets.service.DatasetItem`:
an image's manifest path, a text's row id) (standard library only).

Stratified by class and by the dataset's own train/val split, so what the trials keep for
training and for validation stays in the dataset's proportions. Trials never see these items:
the worker removes them from the dataset's items before it builds the training and validation
sets, for images and texts alike.
"""

import json
import random
from collections.abc import Iterable
from typing import Protocol

TEST_PREDICTIONS_FILE = "test_predictions.json"
"""Written by a trial next to its exported model: its answer on every test item, in order."""


class DatasetItem(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def label(self) -> int: ...
    @property
    def split(self) -> str: ...


def test_split_key(experiment_id: str) -> str:
    return f"experiments/{experiment_id}/test_split.json"


def carve_test_split(items: Iterable[DatasetItem], *, fraction: float, seed: int) -> list[str]:
    """The ids of the items held out for testing: `fraction` of each (class, split) group, at
    least one sample of a group of two or more and never all of it; the same for the same
    samples, fraction and seed. Sorted."""
    groups: dict[tuple[int, str], list[str]] = {}
    for item in items:
        groups.setdefault((item.label, str(item.split)), []).append(item.id)
    rng = random.Random(seed)
    chosen: list[str] = []
    for key in sorted(groups):
        ids = sorted(groups[key])
        if len(ids) < 2:
            continue
        count = min(max(1, round(fraction * len(ids))), len(ids) - 1)
        chosen += rng.sample(ids, count)
    return sorted(chosen)


def encode_test_split(ids: list[str], *, fraction: float, seed: int) -> bytes:
    return json.dumps({"fraction": fraction, "seed": seed, "items": ids}).encode()


def decode_test_split(data: bytes) -> list[str]:
    return [str(item) for item in json.loads(data)["items"]]
