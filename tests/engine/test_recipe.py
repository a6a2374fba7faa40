"""The training recipe on real digits (sklearn): imbalance, calibration."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from worker.engine import (
    Predictor,
    Sample,
    TrainingResult,
    TransferConfig,
    compile_plan,
    export_model,
    run,
)
from worker.engine.calibration import expected_calibration_error, fit_temperature
from worker.engine.pixels import image_pixels, normalise

CLASSES = [str(digit) for digit in range(10)]
MINORITY = range(5, 10)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> list[Sample]:
    """The 8x8 digit scans as PNGs, shuffled."""
    folder = tmp_path_factory.mktemp("digits")
    data = load_digits()
    samples = []
    for index, (pixels, label) in enumerate(zip(data.images, data.target, strict=True)):
        path = folder / f"{index:04d}.png"
        Image.fromarray((pixels * 255 / 16).astype(np.uint8)).save(path)
        samples.append(Sample(path, int(label)))
    return [samples[i] for i in np.random.default_rng(0).permutation(len(samples))]


def _first(samples: list[Sample], per_class: Callable[[int], int]) -> list[Sample]:
    taken: dict[int, int] = {}
    chosen = []
    for sample in samples:
        if taken.get(sample.label, 0) < per_class(sample.label):
            taken[sample.label] = taken.get(sample.label, 0) + 1
            chosen.append(sample)
    return chosen


@pytest.fixture(scope="module")
def imbalanced(digits: list[Sample]) -> tuple[list[Sample], list[Sample]]:
    """Training: 60 of each digit 0-4 but 4 of each digit 5-9; validation: 20 of each."""
    pool, rest = digits[:1000], digits[1000:]
    train = _first(pool, lambda label: 4 if label in MINORITY else 60)
    return train, _first(rest, lambda label: 20)


def _digits_config(**overrides: Any) -> TransferConfig:
    settings: dict[str, Any] = {
        "base_model": "efficientnet_lite0",
        "strategy": "feature_extraction",
        "num_classes": 10,
        "image_size": 64,
        "epochs": 5,
        "lr": 3e-3,
        **overrides,
    }
    return TransferConfig(**settings)


def _minority_recall(metrics: dict[str, Any]) -> float:
    return float(np.mean([metrics["per_class"][label]["recall"] for label in MINORITY]))


def test_balanced_weights_and_sampler_raise_minority_recall(
    imbalanced: tuple[list[Sample], list[Sample]],
) -> None:
    train, val = imbalanced
    results = {
        name: run(compile_plan(_digits_config(**settings)), train=train, val=val, classes=CLASSES)
        for name, settings in {
            "plain": {},
            "class_weights": {"class_weights": "balanced"},
            "sampler": {"sampler": "balanced"},
        }.items()
    }
    recall = {name: _minority_recall(result.metrics) for name, result in results.items()}
    macro_f1 = {name: result.metrics["macro_f1"] for name, result in results.items()}
    print(f"minority recall {recall}, macro-F1 {macro_f1}")
    assert recall["class_weights"] >= recall["plain"] + 0.1
    assert recall["sampler"] >= recall["plain"] + 0.1
    assert macro_f1["class_weights"] > macro_f1["plain"]
    per_class = results["plain"].metrics["per_class"]
    f1_mean = np.mean([row["f1"] for row in per_class])
    assert results["plain"].metrics["macro_f1"] == pytest.approx(f1_mean)


def test_fit_temperature_recovers_the_temperature_labels_were_drawn_at() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 5, generator=generator) * 4
    labels = torch.multinomial((logits / 2.5).softmax(dim=1), 1, generator=generator).squeeze(1)
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.1)
    # Over-confident logits are badly calibrated until divided by that temperature.
    before = expected_calibration_error(logits, labels)
    after = expected_calibration_error(logits / 2.5, labels)
    assert before > 0.1 > 0.03 > after


@pytest.fixture(scope="module")
def calibrated_run(digits: list[Sample]) -> TrainingResult:
    """A head trained briefly on frozen features: its confidence is off (too low here)."""
    train, val = digits[:300], digits[300:500]
    plan = compile_plan(_digits_config())
    return run(plan, train=train, val=val, classes=CLASSES)


def test_temperature_scaling_lowers_validation_ece(calibrated_run: TrainingResult) -> None:
    calibration = calibrated_run.metrics["calibration"]
    print(f"calibration {calibration}")
    assert calibration["ece_after"] < calibration["ece_before"]
    assert calibration["nll_after"] <= calibration["nll_before"]
    assert calibrated_run.calibration is not None
    assert calibration["temperature"] == calibrated_run.calibration.temperature != 1.0


def test_predict_answers_calibrated_probabilities_and_raw_ones_on_request(
    calibrated_run: TrainingResult, digits: list[Sample], tmp_path: Path
) -> None:
    plan = compile_plan(_digits_config())
    export_model(calibrated_run, plan, tmp_path)
    temperature = json.loads((tmp_path / "config.json").read_text())["calibration"]["temperature"]
    assert temperature == calibrated_run.metrics["calibration"]["temperature"]
    predictor = Predictor.load(tmp_path)
    images = [Image.open(sample.path) for sample in digits[300:304]]
    calibrated = predictor.predict(images, top_k=10)
    raw = predictor.predict(images, top_k=10, calibrated=False)
    pixels = np.stack([image_pixels(image, 64) for image in images])
    batch = torch.from_numpy(normalise(pixels, predictor.exported.preprocessing))
    with torch.no_grad():
        logits = predictor.model(batch)
    for row, want in zip(calibrated, (logits / temperature).softmax(dim=1), strict=True):
        for label, probability in row:
            assert probability == pytest.approx(float(want[int(label)]), abs=1e-5)
    for row, want in zip(raw, logits.softmax(dim=1), strict=True):
        for label, probability in row:
            assert probability == pytest.approx(float(want[int(label)]), abs=1e-5)
