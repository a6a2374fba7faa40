"""An experiment's test split: carved once, seeded and stratified, out of the dataset's samples,
and kept in storage as the list of the held-out samples' manifest paths (standard library only).

Stratified by class and by the dataset's own train/val split, so what the trials keep for
training and for validation stays in the dataset's proportions. Trials never see these samples:
the worker removes them from the manifest before it builds the training and validation sets.
"""

import json
import random
from collections.abc import Iterable
from typing import Protocol

TEST_PREDICTIONS_FILE = "test_predictions.json"
"""Written by a trial next to its exported model: its answer on every test item, in order."""


class ManifestSample(Protocol):
    @property
    def path(self) -> str: ...
    @property
    def label(self) -> int: ...
    @property
    def split(self) -> str: ...


def test_split_key(experiment_id: str) -> str:
    return f"experiments/{experiment_id}/test_split.json"


def carve_test_split(samples: Iterable[ManifestSample], *, fraction: float, seed: int) -> list[str]:
    """The manifest paths held out for testing: `fraction` of each (class, split) group, at
    least one sample of a group of two or more and never all of it; the same for the same
    samples, fraction and seed. Sorted."""
    groups: dict[tuple[int, str], list[str]] = {}
    for sample in samples:
        groups.setdefault((sample.label, str(sample.split)), []).append(sample.path)
    rng = random.Random(seed)
    chosen: list[str] = []
    for key in sorted(groups):
        paths = sorted(groups[key])
        if len(paths) < 2:
            continue
        count = min(max(1, round(fraction * len(paths))), len(paths) - 1)
        chosen += rng.sample(paths, count)
    return sorted(chosen)


def encode_test_split(paths: list[str], *, fraction: float, seed: int) -> bytes:
    return json.dumps({"fraction": fraction, "seed": seed, "items": paths}).encode()


def decode_test_split(data: bytes) -> list[str]:
    return [str(path) for path in json.loads(data)["items"]]
