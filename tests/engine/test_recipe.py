"""The training recipe on real digits (sklearn): imbalance, calibration, test-time
augmentation."""

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from service.datasets.ingest import IngestLimits
from service.inference.resolution import ServedVersion
from service.inference.service import ItemReader, fill_predictions, load_model
from worker.engine import (
    Predictor,
    Sample,
    TrainingHooks,
    TrainingPaused,
    TrainingResult,
    TransferConfig,
    build_model,
    compile_plan,
    describe_plan,
    export_model,
    run,
)
from worker.engine.calibration import expected_calibration_error, fit_temperature
from worker.engine.ema import WeightAverage
from worker.engine.imbalance import training_sampler
from worker.engine.loop import evaluate
from worker.engine.modalities.image.augment import augmented_batches, batch_mix, image_transform
from worker.engine.modalities.image.exported import ExportedImagePreprocessing
from worker.engine.modalities.image.inputs import ImageInputs
from worker.engine.modalities.image.pixels import image_pixels, normalise, view_pixels
from worker.engine.modalities.image.tta import evaluate_tta
from worker.engine.onnx_export import export_onnx
from worker.engine.plan import Plan
from worker.engine.recipe import CROP_VIEWS, TTA_MODES, tta_views
from worker.engine.spec import TtaMode

CROP_VIEWS_WITH_ORIGINAL = ("original", *CROP_VIEWS)

CLASSES = [str(digit) for digit in range(10)]
MINORITY = range(5, 10)


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
        # A head stepped briefly (imbalance, calibration and TTA act on it); solved heads are
        # tested in test_linear_probe.py.
        "solve_head": False,
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
    batch = torch.from_numpy(normalise(pixels, ExportedImagePreprocessing.of(predictor.exported)))
    with torch.no_grad():
        logits = predictor.model(batch)
    for row, want in zip(calibrated, (logits / temperature).softmax(dim=1), strict=True):
        for label, probability in row:
            assert probability == pytest.approx(float(want[int(label)]), abs=1e-5)
    for row, want in zip(raw, logits.softmax(dim=1), strict=True):
        for label, probability in row:
            assert probability == pytest.approx(float(want[int(label)]), abs=1e-5)


class _PauseAfter(TrainingHooks):
    def __init__(self, steps: int | None = None) -> None:
        self.steps = steps
        self.done = 0

    def on_progress(self, done_steps: int, total_steps: int) -> None:
        self.done = done_steps

    def should_pause(self) -> bool:
        return self.steps is not None and self.done >= self.steps


AUGMENTED = TransferConfig(
    base_model="mobilenet_v3_small",
    strategy="fine_tune",
    num_classes=3,
    image_size=64,
    batch_size=8,
    epochs=3,
    pretrained=False,
    augment="strong",
    sampler="balanced",
    class_weights="balanced",
)


def test_augmented_run_paused_mid_epoch_resumes_with_exactly_the_same_weights(
    tmp_path: Path, colour_data: tuple[list[Sample], list[Sample]]
) -> None:
    train, val = colour_data
    classes = ["r", "g", "b"]
    plan = compile_plan(AUGMENTED)
    uninterrupted = run(plan, train=train, val=val, classes=classes)
    checkpoint = tmp_path / "checkpoint.pt"
    # 24 images in batches of 8: 3 steps an epoch; pause inside the second epoch.
    with pytest.raises(TrainingPaused):
        run(plan, train=train, val=val, classes=classes, hooks=_PauseAfter(4),
            checkpoint_path=checkpoint)  # fmt: skip
    resumed = run(
        plan,
        train=train,
        val=val,
        classes=classes,
        hooks=_PauseAfter(),
        checkpoint_path=checkpoint,
        resume_from=checkpoint,
    )
    expected = uninterrupted.model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in resumed.model.state_dict().items())
    assert [r.train_loss for r in resumed.history] == [r.train_loss for r in uninterrupted.history]
    # The augmentation is real: without it the same seed trains other weights.
    plain = run(compile_plan(replace(AUGMENTED, augment="none")), train=train, val=val,
                classes=classes)  # fmt: skip
    assert [r.train_loss for r in plain.history] != [r.train_loss for r in resumed.history]


def test_augment_levels_flip_switch_and_the_preview_per_stage() -> None:
    config = TransferConfig(
        base_model="resnet18",
        num_classes=3,
        image_size=64,
        pretrained=False,
        augment="standard",
        flip=False,
    )
    plan = compile_plan(config)
    kinds = [type(step) for step in image_transform(plan, 64).transforms]
    assert v2.RandomResizedCrop in kinds
    assert v2.TrivialAugmentWide in kinds
    assert v2.RandomHorizontalFlip not in kinds
    flipped = compile_plan(replace(config, augment="light", flip=True))
    kinds = [type(step) for step in image_transform(flipped, 64).transforms]
    assert v2.RandomHorizontalFlip in kinds
    assert v2.TrivialAugmentWide not in kinds
    strong = compile_plan(replace(config, augment="strong"))
    assert v2.RandomErasing in [type(step) for step in image_transform(strong, 64).transforms]
    assert batch_mix(strong) is not None
    assert batch_mix(plan) is None
    # freeze_unfreeze: the cached head stage trains on the features of `feature_views`
    # augmented views of each image; the unfreeze stage on freshly augmented images.
    preview = describe_plan(plan, build_model(plan, weights_dir=None))
    assert [(stage["augment"], stage["feature_views"]) for stage in preview] == [
        ("standard", 4),
        ("standard", None),
    ]
    assert [stage["tta"] for stage in preview] == [None, ["original"]]


def test_text_models_refuse_image_augmentation_and_the_balanced_sampler() -> None:
    for setting in ({"augment": "light"}, {"sampler": "balanced"}):
        with pytest.raises(ValueError, match=next(iter(setting))):
            compile_plan(TransferConfig(base_model="minilm_l6", num_classes=3, **setting))


def test_each_sample_is_augmented_alike_whichever_process_loads_it(
    colour_data: tuple[list[Sample], list[Sample]],
) -> None:
    """Every crop, flip, operation and mix comes from the seed drawn with the sample order, so
    loading with worker processes (a resumed job's worker may use another count) changes
    nothing."""
    train, _ = colour_data
    plan = compile_plan(AUGMENTED)
    epochs = []
    for workers in (0, 2):
        generator = torch.Generator().manual_seed(0)
        sampler = training_sampler(plan, [sample.label for sample in train], generator)
        loader = augmented_batches(train, plan, 64, generator, sampler, num_workers=workers)
        epochs.append(list(loader))
    for (images, targets), (other_images, other_targets) in zip(*epochs, strict=True):
        assert torch.equal(images, other_images)
        assert torch.equal(targets, other_targets)
    # MixUp/CutMix made the targets class probabilities.
    assert epochs[0][0][1].dtype == torch.float32


@pytest.fixture(scope="module")
def tta_run(digits: list[Sample]) -> tuple[Plan, TrainingResult]:
    plan = compile_plan(_digits_config(epochs=2, tta="flip_crops"))
    return plan, run(plan, train=digits[:200], val=digits[200:260], classes=CLASSES)


def test_tta_in_predict_equals_tta_in_evaluation_on_both_backends(
    tta_run: tuple[Plan, TrainingResult], digits: list[Sample], tmp_path: Path
) -> None:
    plan, result = tta_run
    val = digits[200:260]
    recorded = result.metrics["tta"]
    print(f"tta {recorded}")
    assert recorded["views"] == list(tta_views("flip_crops", flip=True))
    assert len(recorded["views"]) == 12
    assert recorded["val_accuracy_without"] == result.metrics["val_accuracy"]
    assert recorded["gain"] == pytest.approx(
        recorded["val_accuracy"] - result.metrics["val_accuracy"]
    )
    _, evaluated = evaluate_tta(result.model, val, plan, torch.device("cpu"))
    assert float((evaluated.argmax(dim=1) == torch.tensor([s.label for s in val])).float().mean()) \
        == recorded["val_accuracy"]  # fmt: skip
    export_model(result, plan, tmp_path)
    assert (
        json.loads((tmp_path / "config.json").read_text())["preprocessing"]["tta"]
        == (recorded["views"])
    )
    assert export_onnx(result.model, image_size=64, out_path=tmp_path / "model.onnx").exported
    images = [Image.open(sample.path) for sample in val]
    torch_rows = Predictor.load(tmp_path).predict(images, top_k=10, calibrated=False)
    served = ServedVersion("v", "digits", 1, "", {"onnx": {"exported": True}})
    onnx_model = load_model(tmp_path, version=served, backend="onnx", threads=1)
    assert onnx_model.backend == "onnx"
    encoded = [(f"{i}.png", Path(sample.path).read_bytes()) for i, sample in enumerate(val)]
    reading = ItemReader(IngestLimits(), max_text_chars=0)
    results, good, pixels = onnx_model.inputs.prepare(encoded, reading)
    outputs = onnx_model.forward(onnx_model.batch_input([pixels]))
    fill_predictions(onnx_model, results, good, outputs, task="main", top_k=10, calibrated=False)
    for want, torch_row, served_row in zip(evaluated, torch_rows, results, strict=True):
        assert served_row["top"] is not None
        onnx_row = [(entry["label"], entry["probability"]) for entry in served_row["top"]]
        for row in (torch_row, onnx_row):
            assert len(row) == 10
            for label, probability in row:
                assert probability == pytest.approx(float(want[int(label)]), abs=1e-4)


def test_tta_views_drop_mirrors_without_flip_and_text_refuses_tta() -> None:
    assert set(TTA_MODES) == set(get_args(TtaMode))
    assert tta_views("flip_crops", flip=False) == CROP_VIEWS_WITH_ORIGINAL
    assert tta_views("none", flip=True) == ("original",)
    with pytest.raises(ValueError, match="tta: `flip` with `flip: false`"):
        compile_plan(_digits_config(tta="flip", flip=False))
    with pytest.raises(ValueError, match="tta: minilm_l6 is a text model"):
        compile_plan(TransferConfig(base_model="minilm_l6", num_classes=3, tta="flip"))
    image = Image.fromarray(np.arange(10 * 10 * 3, dtype=np.uint8).reshape(10, 10, 3))
    views = view_pixels(image, 7, ("original", "flip", "crop_top_left", "flip_crop_top_left"))
    assert np.array_equal(views[0], image_pixels(image, 7))
    assert np.array_equal(views[1], views[0][:, ::-1])
    assert np.array_equal(views[3], views[2][:, ::-1])
    enlarged = np.asarray(image.resize((8, 8), Image.Resampling.BILINEAR))
    assert np.array_equal(views[2], enlarged[:7, :7])


def test_weight_average_is_the_warmed_up_exponential_average_of_the_trained_weights() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    model[1].weight.requires_grad_(False)  # frozen: never averaged, stays as it was
    average = WeightAverage(0.8)
    average.start_stage(model)
    expected = model[0].weight.detach().clone()
    for step in range(6):
        with torch.no_grad():
            model[0].weight.add_(torch.randn(2, 3))
        model.train()(torch.randn(4, 3))  # moves BatchNorm's running statistics
        average.update(model)
        decay = min(0.8, (1 + step) / (10 + step))
        expected = decay * expected + (1 - decay) * model[0].weight.detach()
    assert [min(0.8, (1 + n) / (10 + n)) for n in (0, 5)] == [0.1, 0.4]
    assert torch.allclose(average.shadow["0.weight"], expected, atol=1e-6)
    assert not torch.allclose(average.shadow["0.weight"], model[0].weight)
    assert torch.equal(average.shadow["1.running_mean"], model[1].running_mean)
    assert torch.equal(average.shadow["1.weight"], model[1].weight)
    trained = model[0].weight.detach().clone()
    with average.applied(model):
        assert torch.equal(model[0].weight, average.shadow["0.weight"])
    assert torch.equal(model[0].weight, trained)


EMA = TransferConfig(
    base_model="mobilenet_v3_small",
    strategy="freeze_unfreeze",
    head_epochs=1,
    num_classes=3,
    image_size=64,
    batch_size=8,
    epochs=3,
    pretrained=False,
    bn_mode="train",
    ema=0.9,
    # Steps in both stages, so that both average.
    solve_head=False,
)


class _KeepFirstCheckpoint(TrainingHooks):
    """Copies the checkpoint written at the end of the first epoch (the head stage's end)."""

    def __init__(self, copy: Path) -> None:
        self.copy = copy

    def on_checkpoint(self, path: Path) -> None:
        if not self.copy.exists():
            self.copy.write_bytes(path.read_bytes())


def test_ema_is_validated_exported_and_resumed_exactly(
    tmp_path: Path, colour_data: tuple[list[Sample], list[Sample]]
) -> None:
    train, val = colour_data
    classes = ["r", "g", "b"]
    plan = compile_plan(EMA)
    uninterrupted = run(plan, train=train, val=val, classes=classes)
    expected = uninterrupted.model.state_dict()
    # The returned (exported) weights are the average, and the metrics are of them.
    model = uninterrupted.model
    loader = ImageInputs(plan, device=torch.device("cpu"), shuffle=torch.Generator(),
                         num_workers=0).batches(val, plan.stages[-1], shuffled=False)  # fmt: skip
    assert evaluate(model, loader, torch.device("cpu")).loss == pytest.approx(
        uninterrupted.metrics["val_loss"], abs=1e-6
    )
    plain = run(compile_plan(replace(EMA, ema=None)), train=train, val=val, classes=classes)
    assert not torch.equal(plain.model.head[-1].weight, model.head[-1].weight)
    checkpoint, stage_end = tmp_path / "checkpoint.pt", tmp_path / "stage-end.pt"
    # 24 images in batches of 8: 3 steps an epoch; pause inside the unfreeze stage's 2nd epoch.
    with pytest.raises(TrainingPaused):
        run(plan, train=train, val=val, classes=classes, hooks=_PauseAfter(7),
            checkpoint_path=checkpoint)  # fmt: skip
    assert "ema" in torch.load(checkpoint, weights_only=True)
    run(plan, train=train, val=val, classes=classes, hooks=_KeepFirstCheckpoint(stage_end),
        checkpoint_path=tmp_path / "other.pt")  # fmt: skip
    for source in (checkpoint, stage_end):
        resumed = run(plan, train=train, val=val, classes=classes, resume_from=source)
        assert all(torch.equal(v, expected[k]) for k, v in resumed.model.state_dict().items())
        assert resumed.metrics == uninterrupted.metrics
