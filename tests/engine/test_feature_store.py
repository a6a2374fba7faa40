"""Frozen-backbone features shared across runs (`features.py`, `stage_data.py`) through the
worker's store on a local artifact store (`worker/feature_store.py`): a second run reads what
the first computed and ends identically, keys separate what differs, concurrent runs compute
an entry once, and augmented views cost one backbone pass per image and view."""

import multiprocessing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import worker.engine.train as train_module
from service.storage.local import LocalStore
from worker.engine import (
    HeadConfig,
    Sample,
    SharedFeatures,
    StageSpec,
    TrainingHooks,
    TrainingPaused,
    TrainingResult,
    TransferConfig,
    compile_plan,
    run,
)
from worker.engine.features import feature_key, weights_digest
from worker.engine.loop import Precision
from worker.engine.zoo import build_backbone
from worker.feature_store import ArtifactFeatureStore

Data = tuple[list[Sample], list[Sample]]
CLASSES = ["red", "green", "blue"]


@pytest.fixture
def backbone_images(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Images the backbone of each model `run` builds has seen, one counter per run."""
    counts: list[int] = []
    build = train_module.build_model

    def counting(*args: Any, **kwargs: Any) -> nn.Module:
        model = build(*args, **kwargs)
        counts.append(0)
        index = len(counts) - 1

        def count(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            counts[index] += inputs[0].shape[0]

        model.backbone.register_forward_hook(count)
        return model

    monkeypatch.setattr(train_module, "build_model", counting)
    return counts


def _store(root: Path) -> ArtifactFeatureStore:
    return ArtifactFeatureStore(
        LocalStore(root / "store"), prefix="features/ds_test", lock_dir=root / "locks"
    )


def _shared(root: Path, data: Data) -> SharedFeatures:
    train, val = data
    return SharedFeatures(
        store=_store(root),
        train_ids=[f"train/{sample.path.name}" for sample in train],
        val_ids=[f"val/{sample.path.name}" for sample in val],
    )


def _entries(root: Path) -> list[Path]:
    return sorted((root / "store").rglob("*.safetensors"))


def _same(first: TrainingResult, second: TrainingResult) -> None:
    expected = first.model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in second.model.state_dict().items())
    assert [(r.train_loss, r.val_loss, r.val_accuracy) for r in first.history] == [
        (r.train_loss, r.val_loss, r.val_accuracy) for r in second.history
    ]
    assert first.metrics == second.metrics


# A head with dropout, then the whole model: the random streams after the cached stage matter.
HEAD_THEN_ALL = {
    "head": HeadConfig(hidden=(16,), dropout=0.3),
    "stages": (
        StageSpec(groups=("head",), epochs=2, lr=0.01),
        StageSpec(groups=("all",), epochs=1),
    ),
}


def test_a_second_run_reads_the_features_and_ends_exactly_like_a_cold_one(
    tmp_path: Path,
    colour_data: Data,
    make_config: Callable[..., TransferConfig],
    backbone_images: list[int],
) -> None:
    train, val = colour_data
    plan = compile_plan(make_config(**HEAD_THEN_ALL))
    shared = _shared(tmp_path, colour_data)

    without_store = run(plan, train=train, val=val, classes=CLASSES)
    cold = run(plan, train=train, val=val, classes=CLASSES, shared_features=shared)
    warm = run(plan, train=train, val=val, classes=CLASSES, shared_features=shared)

    fine_tuning = len(train) + len(val)  # one epoch of the second stage, and its evaluation
    assert backbone_images == [
        len(train) + len(val) + fine_tuning,
        len(train) + len(val) + fine_tuning,
        fine_tuning,  # no features computed: both entries read from the store
    ]
    assert len(_entries(tmp_path)) == 2  # train and val
    _same(without_store, cold)
    _same(cold, warm)


def test_other_weights_or_preprocessing_compute_their_own_features(
    tmp_path: Path,
    colour_data: Data,
    make_config: Callable[..., TransferConfig],
    backbone_images: list[int],
) -> None:
    train, val = colour_data
    shared = _shared(tmp_path, colour_data)
    everything = len(train) + len(val)
    configs = [
        make_config(),
        make_config(seed=1),  # random weights drawn from another seed: other weights
        make_config(image_size=96),
        make_config(batch_size=4),  # computed in other batches, which may round differently
        make_config(epochs=3, lr=0.01),  # same features: read from the store
    ]
    for config in configs:
        run(compile_plan(config), train=train, val=val, classes=CLASSES, shared_features=shared)

    assert backbone_images == [everything, everything, everything, everything, 0]
    assert len(_entries(tmp_path)) == 8


def test_the_key_follows_weights_preprocessing_items_views_and_precision(
    make_config: Callable[..., TransferConfig],
) -> None:
    plan = compile_plan(make_config())
    stage = plan.stages[0]
    backbone = build_backbone("resnet18", pretrained=False, weights_dir=None)
    weights = weights_digest(backbone)
    base: dict[str, Any] = {
        "weights": weights,
        "precision": Precision("cpu"),
        "ids": ["a", "b"],
        "view": None,
    }
    with torch.no_grad():
        next(backbone.parameters()).view(-1)[0] += 1e-3
    variants: list[tuple[Any, Any, dict[str, Any]]] = [
        (plan, stage, base),
        (plan, stage, {**base, "weights": weights_digest(backbone)}),
        (compile_plan(make_config(image_size=96)), None, base),
        (compile_plan(make_config(base_model="mobilenet_v3_small")), None, base),
        (plan, stage, {**base, "ids": ["b", "a"]}),
        (plan, stage, {**base, "view": 0}),
        (compile_plan(make_config(augment="light")), None, {**base, "view": 0}),
        (plan, stage, {**base, "precision": Precision("cpu", torch.bfloat16)}),
        (compile_plan(make_config(batch_size=4)), None, base),
    ]
    keys = [
        feature_key(variant, stage or variant.stages[0], **arguments)
        for variant, stage, arguments in variants
    ]
    assert len(set(keys)) == len(keys)
    assert feature_key(plan, stage, **base) == keys[0]
    with pytest.raises(ValueError, match="one id per"):
        run(
            plan,
            train=[Sample(Path("x.png"), 0)],
            val=[Sample(Path("y.png"), 1)],
            classes=CLASSES,
            shared_features=SharedFeatures(_store(Path("/nonexistent")), ["a", "b"], ["c"]),
        )


class _RacingStore(ArtifactFeatureStore):
    """Both processes miss once before either computes: each waits for the other at its first
    lookup, so they race for every entry."""

    def __init__(self, root: Path, barrier: Any) -> None:
        super().__init__(
            LocalStore(root / "store"), prefix="features/ds_test", lock_dir=root / "locks"
        )
        self.barrier = barrier
        self.first = True

    def get(self, key: str) -> Tensor | None:
        if self.first:
            self.first = False
            self.barrier.wait(timeout=120)
        return super().get(key)


def _fill_concurrently(root: Path, data: Data, barrier: Any, results: Any) -> None:
    torch.set_num_threads(1)
    train, val = data
    counted: list[int] = [0]
    plan = compile_plan(
        TransferConfig(
            base_model="resnet18",
            strategy="feature_extraction",
            num_classes=3,
            image_size=64,
            epochs=1,
            batch_size=8,
            pretrained=False,
        )
    )
    shared = SharedFeatures(
        _RacingStore(root, barrier),
        [f"train/{sample.path.name}" for sample in train],
        [f"val/{sample.path.name}" for sample in val],
    )
    build = train_module.build_model

    def counting(*args: Any, **kwargs: Any) -> nn.Module:
        model = build(*args, **kwargs)
        model.backbone.register_forward_hook(
            lambda module, inputs, output: counted.__setitem__(0, counted[0] + len(inputs[0]))
        )
        return model

    train_module.build_model = counting  # type: ignore[assignment]
    result = run(plan, train=train, val=val, classes=CLASSES, shared_features=shared)
    results.put((counted[0], result.metrics["val_loss"]))


def test_two_processes_filling_the_same_entries_compute_them_once(
    tmp_path: Path, colour_data: Data
) -> None:
    spawn = multiprocessing.get_context("spawn")
    barrier, results = spawn.Barrier(2), spawn.Queue()
    workers = [
        spawn.Process(target=_fill_concurrently, args=(tmp_path, colour_data, barrier, results))
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0

    train, val = colour_data
    # Each entry computed by one of them (which one may differ per entry), read by the other.
    assert sum(count for count, _ in outcomes) == len(train) + len(val)
    assert outcomes[0][1] == outcomes[1][1]
    assert len(_entries(tmp_path)) == 2
    assert not [path for path in (tmp_path / "locks").iterdir() if path.suffix != ".lock"]


class _PauseOnce(TrainingHooks):
    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.done = 0

    def on_progress(self, done_steps: int, total_steps: int) -> None:
        self.done = done_steps

    def should_pause(self) -> bool:
        return self.done == self.steps


def test_augmented_views_cost_one_pass_per_view_and_resume_exactly(
    tmp_path: Path,
    colour_data: Data,
    make_config: Callable[..., TransferConfig],
    backbone_images: list[int],
) -> None:
    train, val = colour_data
    # One view at validation: `light` augmentation would default to flip TTA, whose mirrored
    # validation images are one more backbone pass, not a feature view.
    plan = compile_plan(
        make_config(
            epochs=4, augment="light", feature_views=3, tta="none", head=HeadConfig(dropout=0.2)
        )
    )
    assert plan.stages[0].cache_features

    uninterrupted = run(plan, train=train, val=val, classes=CLASSES)
    # K views of each training image and the plain validation images, for 4 epochs.
    assert backbone_images == [3 * len(train) + len(val)]

    checkpoint = tmp_path / "checkpoint.pt"
    shared = _shared(tmp_path, colour_data)
    with pytest.raises(TrainingPaused):  # epoch 2, after its second of 3 steps
        run(
            plan,
            train=train,
            val=val,
            classes=CLASSES,
            hooks=_PauseOnce(5),
            checkpoint_path=checkpoint,
            shared_features=shared,
        )
    resumed = run(
        plan,
        train=train,
        val=val,
        classes=CLASSES,
        checkpoint_path=checkpoint,
        resume_from=checkpoint,
        shared_features=shared,
    )
    assert backbone_images[1:] == [3 * len(train) + len(val), 0]
    assert len(_entries(tmp_path)) == 4  # 3 training views and the validation features
    _same(uninterrupted, resumed)

    plain = run(compile_plan(make_config(epochs=4, head=HeadConfig(dropout=0.2))),
                train=train, val=val, classes=CLASSES)  # fmt: skip
    assert not torch.equal(plain.model.head[-1].weight, uninterrupted.model.head[-1].weight)


def test_lwf_records_the_old_outputs_from_its_warm_ups_features(
    tmp_path: Path,
    colour_data: Data,
    make_config: Callable[..., TransferConfig],
    parent_dir: Path,
    backbone_images: list[int],
) -> None:
    train, val = colour_data
    plan = compile_plan(make_config("lwf", parent_dir=parent_dir, epochs=3, head_epochs=1))
    assert [(stage.cache_features, stage.distill) for stage in plan.stages] == [
        (True, False),
        (False, True),
    ]
    shared = _shared(tmp_path, colour_data)
    cold = run(plan, train=train, val=val, classes=CLASSES, shared_features=shared)
    warm = run(plan, train=train, val=val, classes=CLASSES, shared_features=shared)

    distilling = 2 * (len(train) + len(val))  # the distilled stage's 2 epochs
    # Recording and the warm-up share one pass; a later run reads both from the store.
    assert backbone_images == [len(train) + len(val) + distilling, distilling]
    _same(cold, warm)
