"""Small synthetic datasets and fast configurations shared by the engine tests."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from worker.engine import Sample, TransferConfig

Data = tuple[list[Sample], list[Sample]]

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def _write_colour_images(folder: Path, per_class: int, seed: int) -> list[Sample]:
    """Noisy solid-colour squares: trivially separable, so any bug shows as a wrong number."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for label, colour in enumerate(COLOURS.values()):
        for index in range(per_class):
            noise = rng.integers(-40, 40, size=(32, 32, 3))
            pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
            path = folder / f"{label}_{index}.png"
            Image.fromarray(pixels).save(path)
            samples.append(Sample(path, label))
    return samples


@pytest.fixture(scope="session")
def colour_data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    root = tmp_path_factory.mktemp("colours")
    return (
        _write_colour_images(root / "train", per_class=8, seed=1),
        _write_colour_images(root / "val", per_class=4, seed=2),
    )


@pytest.fixture
def classes() -> list[str]:
    return list(COLOURS)


@pytest.fixture
def make_config() -> Callable[..., TransferConfig]:
    """A resnet18 config small enough to train in about a second on two CPU cores."""

    def make(strategy: str = "feature_extraction", **overrides: Any) -> TransferConfig:
        settings: dict[str, Any] = {
            "base_model": "resnet18",
            "strategy": strategy,
            "num_classes": len(COLOURS),
            "image_size": 64,
            "epochs": 2,
            "batch_size": 8,
            "pretrained": False,
            "schedule": "constant",
            **overrides,
        }
        return TransferConfig(**settings)

    return make
