"""Small synthetic datasets and fast configurations shared by the engine tests."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file
from sklearn.datasets import load_digits

from worker.engine import (
    HeadConfig,
    ParentModel,
    Sample,
    TransferConfig,
    build_model,
    compile_plan,
)
from worker.engine.export import CONFIG_FILE, WEIGHTS_FILE, model_config

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
            # These tests are about stepping (epochs, early stopping, pause and resume): the
            # head stages step here; the solved head is tested with `solve_head=True`.
            "solve_head": False,
            **overrides,
        }
        if "parent_dir" in settings:
            settings["parent"] = ParentModel.from_folder(settings.pop("parent_dir"))
        return TransferConfig(**settings)

    return make


def write_parent(folder: Path, config: TransferConfig, labels: list[str]) -> Path:
    """An exported model as `export_model` writes it, without training: random weights."""
    plan = compile_plan(config)
    model = build_model(plan, weights_dir=None, pretrained=False)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(model_config(plan, labels)))
    return folder


@pytest.fixture(scope="session")
def parent_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-class resnet18 'previous version' with a hidden-layer head, for chained transfer."""
    config = TransferConfig(
        base_model="resnet18",
        strategy="feature_extraction",
        num_classes=2,
        image_size=64,
        pretrained=False,
        head=HeadConfig(hidden=(8,)),
        task_name="shapes",
    )
    return write_parent(tmp_path_factory.mktemp("parent"), config, ["circle", "square"])


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> list[Sample]:
    """sklearn's 8x8 digit scans (1797, real) as PNGs, shuffled; preprocessing upsamples them
    like any upload."""
    folder = tmp_path_factory.mktemp("digits")
    data = load_digits()
    samples = []
    for index, (pixels, label) in enumerate(zip(data.images, data.target, strict=True)):
        path = folder / f"{index:04d}.png"
        Image.fromarray((pixels * 255 / 16).astype(np.uint8)).save(path)
        samples.append(Sample(path, int(label)))
    return [samples[i] for i in np.random.default_rng(0).permutation(len(samples))]
