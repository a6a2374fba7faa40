import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from worker.engine import (
    HeadConfig,
    Predictor,
    Sample,
    TrainingResult,
    TransferConfig,
    compile_plan,
    export_bundle,
    export_model,
    preprocess,
    run,
)
from worker.engine.modalities.image.preprocessing import ImagePreprocessing
from worker.engine.plan import Plan

Data = tuple[list[Sample], list[Sample]]


@pytest.fixture(scope="module")
def trained(
    colour_data: Data, tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainingResult, Plan, Path]:
    config = TransferConfig(
        base_model="efficientnet_lite0",
        strategy="feature_extraction",
        num_classes=3,
        image_size=64,
        epochs=3,
        batch_size=8,
        lr=0.01,
        head=HeadConfig(hidden=(16,), dropout=0.1),
    )
    plan = compile_plan(config)
    train, val = colour_data
    result = run(plan, train=train, val=val, classes=["red", "green", "blue"])
    out_dir = tmp_path_factory.mktemp("export")
    export_model(result, plan, out_dir)
    return result, plan, out_dir


def test_export_writes_weights_and_config(trained: tuple[TrainingResult, Plan, Path]) -> None:
    _, plan, out_dir = trained
    config = json.loads((out_dir / "config.json").read_text())

    assert (out_dir / "weights.safetensors").is_file()
    assert config["format"] == "thaw/1"
    assert config["labels"] == ["red", "green", "blue"]
    assert config["architecture"] == {
        "base_model": "efficientnet_lite0",
        "family": "efficientnet_lite",
        "head": {"hidden": [16], "dropout": 0.1},
        "num_classes": 3,
    }
    assert config["preprocessing"] == {
        "image_size": 64,
        "mean": [0.498, 0.498, 0.498],
        "std": [0.502, 0.502, 0.502],
        "resize": "bilinear",
        "color": "RGB",
        "tta": ["original"],
    }
    assert Plan.from_dict(config["plan"]) == plan


def test_predictor_reproduces_the_trained_model(
    trained: tuple[TrainingResult, Plan, Path], colour_data: Data
) -> None:
    result, plan, out_dir = trained
    _, val = colour_data
    images = [Image.open(sample.path) for sample in val]
    pixels = ImagePreprocessing.of(plan)
    batch = torch.stack(
        [preprocess(image, image_size=64, mean=pixels.mean, std=pixels.std) for image in images]
    )
    with torch.no_grad():
        logits = result.model.eval()(batch)
    temperature = json.loads((out_dir / "config.json").read_text())["calibration"]["temperature"]
    predictor = Predictor.load(out_dir)

    # Raw probabilities are the trained model's softmax; calibrated ones divide the same logits
    # by the temperature fitted on validation before the softmax.
    for calibrated, expected in [
        (False, logits.softmax(dim=1)),
        (True, (logits / temperature).softmax(dim=1)),
    ]:
        predictions = predictor.predict(images, top_k=3, calibrated=calibrated)
        assert len(predictions) == len(val)
        for probabilities, ranked in zip(expected, predictions, strict=True):
            assert [label for label, _ in ranked] == [
                ["red", "green", "blue"][i] for i in probabilities.argsort(descending=True)
            ]
            by_label = dict(ranked)
            for index, label in enumerate(["red", "green", "blue"]):
                assert by_label[label] == pytest.approx(probabilities[index].item(), abs=1e-6)


def test_predictor_clips_top_k_and_handles_any_image_mode(
    trained: tuple[TrainingResult, Plan, Path],
) -> None:
    _, _, out_dir = trained
    predictor = Predictor.load(out_dir)
    images = [Image.new("L", (50, 30), 128), Image.new("RGBA", (20, 90), (200, 40, 40, 255))]

    predictions = predictor.predict(images, top_k=10)

    assert predictor.labels == ["red", "green", "blue"]
    assert [len(ranked) for ranked in predictions] == [3, 3]
    assert sum(p for _, p in predictions[0]) == pytest.approx(1.0)
    assert predictions[1][0][0] == "red"
    assert predictor.predict([]) == []
    # Encoded bytes read as the decoded image does; a text is no image.
    encoded = io.BytesIO()
    images[1].save(encoded, "PNG")
    (from_bytes,) = predictor.predict([encoded.getvalue()], top_k=10)
    assert [label for label, _ in from_bytes] == [label for label, _ in predictions[1]]
    assert [p for _, p in from_bytes] == pytest.approx([p for _, p in predictions[1]], abs=1e-5)
    with pytest.raises(ValueError, match="takes images"):
        predictor.predict(["a red square"])


def test_predictor_rejects_unknown_formats(
    trained: tuple[TrainingResult, Plan, Path], tmp_path: Path
) -> None:
    _, _, out_dir = trained
    config = json.loads((out_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "format": "other/9"}))

    with pytest.raises(ValueError, match="unsupported model format"):
        Predictor.load(tmp_path)


def test_predictor_refuses_mismatched_weights(
    trained: tuple[TrainingResult, Plan, Path],
    tmp_path: Path,
    make_config: Callable[..., TransferConfig],
) -> None:
    _, _, out_dir = trained
    config = json.loads((out_dir / "config.json").read_text())
    config["plan"] = compile_plan(make_config()).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "weights.safetensors").write_bytes((out_dir / "weights.safetensors").read_bytes())

    with pytest.raises(RuntimeError, match="state_dict"):
        Predictor.load(tmp_path)


def test_lwf_model_answers_both_tasks(
    colour_data: Data,
    tmp_path: Path,
    make_config: Callable[..., TransferConfig],
    parent_dir: Path,
) -> None:
    plan = compile_plan(
        make_config("lwf", parent_dir=parent_dir, pretrained=True, task_name="colours")
    )
    train, val = colour_data
    result = run(
        plan, train=train, val=val, classes=["red", "green", "blue"], parent_dir=parent_dir
    )
    export_model(result, plan, tmp_path)
    images = [Image.open(sample.path) for sample in val[:4]]
    pixels = ImagePreprocessing.of(plan)
    batch = torch.stack(
        [preprocess(image, image_size=64, mean=pixels.mean, std=pixels.std) for image in images]
    )
    with torch.no_grad():
        old, new = (logits.softmax(dim=1) for logits in result.model.eval().forward_tasks(batch))

    predictor = Predictor.load(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())

    assert config["tasks"] == [
        {"name": "shapes", "labels": ["circle", "square"]},
        {"name": "colours", "labels": ["red", "green", "blue"]},
    ]
    assert config["labels"] == ["red", "green", "blue"]
    assert list(predictor.tasks) == ["shapes", "colours"]
    for task, expected, labels in [
        (None, new, ["red", "green", "blue"]),
        ("colours", new, ["red", "green", "blue"]),
        ("shapes", old, ["circle", "square"]),
    ]:
        # Raw probabilities: this test is about tasks; calibration has its own tests.
        predictions = predictor.predict(images, top_k=5, task=task, calibrated=False)
        for probabilities, ranked in zip(expected, predictions, strict=True):
            assert dict(ranked) == pytest.approx(
                {label: p.item() for label, p in zip(labels, probabilities, strict=True)},
                abs=1e-6,
            )
    with pytest.raises(ValueError, match="unknown task 'weather'"):
        predictor.predict(images, task="weather")


def test_single_task_models_have_no_task_list(trained: tuple[TrainingResult, Plan, Path]) -> None:
    _, _, out_dir = trained
    config = json.loads((out_dir / "config.json").read_text())

    assert "tasks" not in config
    predictor = Predictor.load(out_dir)
    assert list(predictor.tasks) == ["main"]
    image = Image.new("RGB", (8, 8), (200, 40, 40))
    assert predictor.predict([image], task="main") == predictor.predict([image])


def test_export_bundle_writes_the_whole_version_folder(
    trained: tuple[TrainingResult, Plan, Path], tmp_path: Path
) -> None:
    result, plan, _ = trained
    classes = ["red", "green", "blue"]

    bundle = export_bundle(result, plan, tmp_path / "full", classes=classes)
    assert sorted(path.name for path in (tmp_path / "full").iterdir()) == [
        "config.json",
        "labels.json",
        "model.onnx",
        "weights.safetensors",
    ]
    assert json.loads((tmp_path / "full" / "labels.json").read_text()) == classes
    assert bundle.onnx is not None
    assert bundle.onnx.exported

    without = export_bundle(result, plan, tmp_path / "plain", classes=classes, onnx=False)
    assert without.onnx is None
    assert not (tmp_path / "plain" / "model.onnx").exists()
