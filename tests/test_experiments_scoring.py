"""A trial's test scoring (`worker.trials.evaluate_on_test`): every test item answered once and
recorded against its own label, the latency column timed on the scoring's first items asked one
at a time, and no prediction beyond the scoring's."""

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch
from PIL import Image

from service.datasets.service import DatasetItem
from service.experiments.split import TEST_PREDICTIONS_FILE
from worker import trials
from worker.engine import Predictor, TrainingResult, TransferConfig, compile_plan, export_model
from worker.engine.model import build_model

CLASSES = ["dark", "light"]


class ShadeReader:
    """Stands in for a loaded model: calls an image `light` when its pixel is bright (with 0.9),
    and records the size of every call."""

    def __init__(self) -> None:
        self.exported = SimpleNamespace(modality="image")
        self.calls: list[int] = []

    def predict(self, images: list[Image.Image], top_k: int, task: str | None) -> list[Any]:
        self.calls.append(len(images))
        answers = []
        for image in images:
            light = image.getpixel((0, 0)) > 127
            ranked = [("light", 0.9), ("dark", 0.1)] if light else [("dark", 0.9), ("light", 0.1)]
            answers.append(ranked[:top_k])
        return answers


def shades(folder: Path, labels: list[int]) -> list[DatasetItem]:
    items = []
    for position, label in enumerate(labels):
        path = folder / f"{position}.png"
        Image.new("L", (4, 4), 255 if label else 0).save(path)
        items.append(DatasetItem(id=f"item-{position}", label=label, split="val", content=path))
    return items


@pytest.mark.parametrize("count", [1, trials.LATENCY_ITEMS, trials.LATENCY_ITEMS + 70])
def test_every_test_item_is_answered_once_and_the_first_ones_timed_alone(
    tmp_path: Path, count: int
) -> None:
    labels = [(position * 7) % 3 % 2 for position in range(count)]
    test = shades(tmp_path, labels)
    # One item the model gets wrong, late in the split (scored in a batch when there is one).
    wrong = count - 1
    Image.new("L", (4, 4), 0 if labels[wrong] else 255).save(test[wrong].content)
    reader = ShadeReader()

    metrics = trials.evaluate_on_test(cast(Predictor, reader), tmp_path, test, classes=CLASSES)

    written = json.loads((tmp_path / TEST_PREDICTIONS_FILE).read_text())["items"]
    assert [item["item"] for item in written] == [item.id for item in test]
    assert [item["label"] for item in written] == labels
    assert [item["predicted"] for item in written] == [
        1 - label if position == wrong else label for position, label in enumerate(labels)
    ]
    assert metrics["test_items"] == count
    assert metrics["test_accuracy"] == pytest.approx((count - 1) / count)
    timed = min(count, trials.LATENCY_ITEMS)
    rest = count - timed
    batches = [
        min(trials.EVALUATION_BATCH, rest - s) for s in range(0, rest, trials.EVALUATION_BATCH)
    ]
    assert reader.calls == [1] * timed + batches
    assert metrics["latency_ms_per_item"] > 0


def test_the_trained_model_in_memory_scores_as_its_exported_files(tmp_path: Path) -> None:
    """A trial scores the model it has just exported without loading it again, and answers as
    the exported files do."""
    plan = compile_plan(
        TransferConfig(
            base_model="efficientnet_lite0",
            strategy="feature_extraction",
            num_classes=2,
            image_size=64,
            pretrained=False,
        )
    )
    torch.manual_seed(0)
    model = build_model(plan, weights_dir=None, pretrained=False)
    model.train()
    result = TrainingResult(model=model, history=[], metrics={"classes": CLASSES})
    export_model(result, plan, tmp_path)
    images = [Image.new("RGB", (40, 30), (shade, 255 - shade, 90)) for shade in (0, 90, 200)]

    in_memory = Predictor.load(tmp_path, model=model)
    from_files = Predictor.load(tmp_path)

    assert in_memory.model is model
    assert not model.training
    for ranked, expected in zip(
        in_memory.predict(images, top_k=2), from_files.predict(images, top_k=2), strict=True
    ):
        assert [label for label, _ in ranked] == [label for label, _ in expected]
        assert [p for _, p in ranked] == pytest.approx([p for _, p in expected], abs=1e-6)
