import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import worker.engine.train as train_module
from worker.engine import (
    EpochResult,
    HeadConfig,
    Sample,
    StageSpec,
    TrainingCancelled,
    TrainingHooks,
    TrainingPaused,
    TrainingResult,
    TransferConfig,
    TransferModel,
    compile_plan,
    run,
)
from worker.engine.optim import make_scheduler, schedule_factor
from worker.engine.resume import PausedEpoch, ResumeState, StageStart

Data = tuple[list[Sample], list[Sample]]


class _Spy:
    """Captures the model `run` builds, its initial state, and its state after every epoch."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.model: TransferModel | None = None
        self.states: list[dict[str, Tensor]] = []
        self.backbone_images = 0
        self.optimizers: list[torch.optim.Optimizer] = []
        build = train_module.build_model
        make_optimizer = train_module.make_optimizer

        def spy(*args: Any, **kwargs: Any) -> TransferModel:
            model = build(*args, **kwargs)
            self.model = model
            self.snapshot()
            model.backbone.register_forward_hook(self._count)
            return model

        def spy_optimizer(*args: Any, **kwargs: Any) -> torch.optim.Optimizer:
            optimizer = make_optimizer(*args, **kwargs)
            self.optimizers.append(optimizer)
            return optimizer

        monkeypatch.setattr(train_module, "build_model", spy)
        monkeypatch.setattr(train_module, "make_optimizer", spy_optimizer)

    def _count(self, module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        self.backbone_images += args[0].shape[0]

    def snapshot(self) -> None:
        assert self.model is not None
        self.states.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})


class _EpochSnapshots(TrainingHooks):
    def __init__(self, spy: _Spy) -> None:
        self.spy = spy
        self.results: list[EpochResult] = []

    def on_epoch_end(self, result: EpochResult) -> None:
        self.results.append(result)
        self.spy.snapshot()


def _changed(before: dict[str, Tensor], after: dict[str, Tensor]) -> set[str]:
    return {name for name in before if not torch.equal(before[name], after[name])}


def _names(model: TransferModel, prefixes: tuple[str, ...], *, buffers: bool) -> set[str]:
    tensors: Iterator[tuple[str, Tensor]] = (
        model.named_buffers() if buffers else model.named_parameters()
    )
    return {name for name, _ in tensors if name.startswith(prefixes)}


def _group_tensors(model: TransferModel) -> dict[str, tuple[set[str], set[str]]]:
    """Per group: the state-dict names of its parameters and of its BatchNorm statistics."""
    names = {id(tensor): name for name, tensor in model.state_dict(keep_vars=True).items()}
    groups = {}
    for group, modules in model.groups():
        parameters = {names[id(p)] for m in modules for p in m.parameters()}
        statistics = {
            names[id(b)]
            for m in modules
            for sub in m.modules()
            if isinstance(sub, nn.modules.batchnorm._BatchNorm)
            for b in sub.buffers()
        }
        groups[group] = (parameters, statistics)
    return groups


PRESETS = [
    ("resnet18", "feature_extraction", "frozen", {}),
    ("resnet18", "fine_tune", "frozen", {}),
    ("resnet18", "fine_tune", "train", {}),
    ("resnet18", "partial", "train", {"partial_groups": 1}),
    ("resnet18", "freeze_unfreeze", "frozen", {}),
    ("efficientnet_lite0", "freeze_unfreeze", "train", {}),
    ("mobilenet_v3_small", "gradual_unfreeze", "train", {"epochs": 3}),
    ("resnet18", "lwf", "frozen", {"pretrained": True}),
    ("mobilenet_v3_small", "scratch", "frozen", {"epochs": 1}),
    (
        "mobilenet_v3_small",
        "fine_tune",
        "frozen",
        {
            "stages": (
                StageSpec(groups=("head",), lr=0.01),
                StageSpec(groups=("stem", "top:1"), bn_mode="train", schedule="one_cycle"),
            ),
            "progressive_resizing": (64, 96),
            "image_size": 96,
        },
    ),
]


@pytest.mark.parametrize(
    ("base_model", "strategy", "bn_mode", "overrides"),
    PRESETS,
    ids=[f"{p[0]}-{p[1]}-{p[2]}{'-stages' if 'stages' in p[3] else ''}" for p in PRESETS],
)
def test_exactly_the_planned_parameters_change(
    monkeypatch: pytest.MonkeyPatch,
    make_config: Callable[..., TransferConfig],
    colour_data: Data,
    classes: list[str],
    parent_dir: Path,
    base_model: str,
    strategy: str,
    bn_mode: str,
    overrides: dict[str, Any],
) -> None:
    if strategy == "lwf":
        overrides = {**overrides, "parent_dir": parent_dir}
    settings = {"epochs": 2, "bn_mode": bn_mode, **overrides}
    plan = compile_plan(make_config(strategy, base_model=base_model, **settings))
    spy = _Spy(monkeypatch)
    hooks = _EpochSnapshots(spy)
    train, val = colour_data

    parent = parent_dir if strategy == "lwf" else None
    run(plan, train=train, val=val, classes=classes, hooks=hooks, parent_dir=parent)

    assert spy.model is not None
    groups = _group_tensors(spy.model)
    assert any(statistics for _, statistics in groups.values())
    states = spy.states  # [0]: as built, [n]: after global epoch n
    assert len(states) == 1 + sum(stage.epochs for stage in plan.stages)
    end = 0
    for stage, optimizer in zip(plan.stages, spy.optimizers, strict=True):
        start, end = end, end + stage.epochs
        expected = set()
        for group in stage.trainable_groups:
            parameters, statistics = groups[group]
            expected |= parameters
            if stage.bn_mode == "train":
                expected |= statistics
        assert _changed(states[start], states[end]) == expected, f"stage {stage.name}"
        planned = {group["name"]: group["initial_lr"] for group in optimizer.param_groups}
        assert planned == pytest.approx(stage.group_lrs)
        for result in hooks.results[start:end]:
            # The schedule scales every group alike, so the planned ratios hold throughout.
            factors = {g: lr / stage.group_lrs[g] for g, lr in result.learning_rates.items()}
            assert set(factors) == set(stage.trainable_groups)
            assert max(factors.values()) == pytest.approx(min(factors.values()))


def test_feature_cache_runs_the_backbone_once_per_image(
    monkeypatch: pytest.MonkeyPatch,
    make_config: Callable[..., TransferConfig],
    colour_data: Data,
    classes: list[str],
) -> None:
    plan = compile_plan(make_config("feature_extraction", epochs=4))
    spy = _Spy(monkeypatch)
    train, val = colour_data

    result = run(plan, train=train, val=val, classes=classes)

    assert len(result.history) == 4
    assert spy.backbone_images == len(train) + len(val)


def test_same_seed_gives_identical_results(
    make_config: Callable[..., TransferConfig], colour_data: Data, classes: list[str]
) -> None:
    plan = compile_plan(
        make_config(
            "fine_tune", base_model="mobilenet_v3_small", schedule="cosine", label_smoothing=0.1
        )
    )
    train, val = colour_data

    first = run(plan, train=train, val=val, classes=classes)
    second = run(plan, train=train, val=val, classes=classes)

    assert first.metrics == second.metrics
    assert [r.train_loss for r in first.history] == [r.train_loss for r in second.history]
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            first.model.state_dict().values(), second.model.state_dict().values(), strict=True
        )
    )


def test_metrics_describe_the_validation_set(
    make_config: Callable[..., TransferConfig], colour_data: Data, classes: list[str]
) -> None:
    plan = compile_plan(make_config("feature_extraction", epochs=3, lr=0.01))
    train, val = colour_data

    metrics = run(plan, train=train, val=val, classes=classes).metrics

    confusion = torch.tensor(metrics["confusion_matrix"])
    assert metrics["classes"] == classes
    assert confusion.shape == (3, 3)
    assert confusion.sum(dim=1).tolist() == [s["support"] for s in metrics["per_class"]] == [4] * 3
    assert metrics["val_accuracy"] == pytest.approx(confusion.trace().item() / len(val))
    assert metrics["val_loss"] > 0
    for row in metrics["per_class"]:
        assert 0 <= row["precision"] <= 1
        assert 0 <= row["recall"] <= 1


def test_checkpoint_is_written_and_loads_safely(
    tmp_path: Path,
    make_config: Callable[..., TransferConfig],
    colour_data: Data,
    classes: list[str],
) -> None:
    plan = compile_plan(make_config("freeze_unfreeze", epochs=3, optimizer="sgd"))
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    train, val = colour_data

    result = run(plan, train=train, val=val, classes=classes, checkpoint_path=checkpoint)

    state = torch.load(checkpoint, weights_only=True)
    assert (state["stage_index"], state["epoch"]) == (1, 2)
    assert len(state["history"]) == 3
    assert state["optimizer"]["param_groups"][-1]["name"] == "head"
    assert set(state["rng"]) == {"python", "numpy", "torch", "shuffle"}
    final = result.model.state_dict()
    assert all(torch.equal(state["model"][name], final[name]) for name in final)
    assert [path.name for path in checkpoint.parent.iterdir()] == ["checkpoint.pt"]


def test_early_stopping_keeps_the_best_weights(
    make_config: Callable[..., TransferConfig], colour_data: Data, classes: list[str]
) -> None:
    # A huge head rate makes the validation loss jump around, so patience 1 must trigger.
    plan = compile_plan(
        make_config("feature_extraction", epochs=8, lr=3.0, early_stopping_patience=1)
    )
    train, val = colour_data

    result = run(plan, train=train, val=val, classes=classes)

    losses = [r.val_loss for r in result.history]
    assert len(losses) < 8
    assert losses[-1] >= min(losses[:-1])
    assert all(later < earlier for earlier, later in itertools.pairwise(losses[:-1]))
    assert result.metrics["val_loss"] == min(losses)


def test_should_stop_cancels_between_steps(
    make_config: Callable[..., TransferConfig], colour_data: Data, classes: list[str]
) -> None:
    class StopAfterTwoSteps(TrainingHooks):
        def __init__(self) -> None:
            self.progress: list[tuple[int, int]] = []

        def on_progress(self, done_steps: int, total_steps: int) -> None:
            self.progress.append((done_steps, total_steps))

        def should_stop(self) -> bool:
            return len(self.progress) >= 2

    hooks = StopAfterTwoSteps()
    train, val = colour_data
    plan = compile_plan(make_config("fine_tune", epochs=2))

    with pytest.raises(TrainingCancelled):
        run(plan, train=train, val=val, classes=classes, hooks=hooks)

    assert hooks.progress == [(1, 6), (2, 6)]


def test_cosine_schedule_decays_to_zero() -> None:
    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [parameter], "lr": 0.1}])
    scheduler = make_scheduler(optimizer, "cosine", total_steps=10)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()

    assert rates[0] == pytest.approx(0.1)
    assert rates[5] == pytest.approx(0.05)
    assert rates == sorted(rates, reverse=True)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0)
    assert math.isclose(rates[9], 0.1 * 0.5 * (1 + math.cos(math.pi * 0.9)))


def test_inputs_are_checked(
    make_config: Callable[..., TransferConfig], colour_data: Data, classes: list[str]
) -> None:
    train, val = colour_data
    plan = compile_plan(make_config())

    with pytest.raises(ValueError, match="class names"):
        run(plan, train=train, val=val, classes=classes[:2])
    with pytest.raises(ValueError, match="labels outside"):
        run(plan, train=[*train, Sample(train[0].path, 7)], val=val, classes=classes)


def test_one_cycle_follows_torch_one_cycle_lr() -> None:
    parameter = nn.Parameter(torch.zeros(1))
    ours = torch.optim.SGD([{"params": [parameter], "lr": 0.1}])
    theirs = torch.optim.SGD([{"params": [parameter], "lr": 0.1}])
    scheduler = make_scheduler(ours, "one_cycle", total_steps=20)
    reference = torch.optim.lr_scheduler.OneCycleLR(
        theirs, max_lr=0.1, total_steps=20, cycle_momentum=False
    )
    for _ in range(20):
        assert ours.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"])
        ours.step()
        theirs.step()
        scheduler.step()
        reference.step()


def test_slanted_triangular_rises_briefly_then_decays() -> None:
    rates = [schedule_factor("slanted_triangular", step, 100) for step in range(100)]

    assert rates[0] == pytest.approx(1 / 32)
    assert max(rates) == rates[10] == pytest.approx(1.0)
    assert rates[:11] == sorted(rates[:11])
    assert rates[10:] == sorted(rates[10:], reverse=True)
    assert rates[-1] == pytest.approx((1 + 31 / 90) / 32)


def test_cpu_autocast_runs_a_job_in_bfloat16(
    make_config: Callable[..., TransferConfig], colour_data: Data, classes: list[str]
) -> None:
    plan = compile_plan(
        make_config("fine_tune", base_model="mobilenet_v3_small", epochs=1, amp_cpu=True)
    )
    dtypes: set[torch.dtype] = set()
    build = train_module.build_model

    def spy(*args: Any, **kwargs: Any) -> TransferModel:
        model = build(*args, **kwargs)
        model.backbone.register_forward_hook(lambda _m, _a, output: dtypes.add(output.dtype))
        return model

    train, val = colour_data
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "build_model", spy)
        result = run(plan, train=train, val=val, classes=classes)

    assert dtypes == {torch.bfloat16}
    assert math.isfinite(result.history[0].train_loss)
    assert all(p.dtype == torch.float32 for p in result.model.parameters())


class _StopAfterEpochs(TrainingHooks):
    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self.done = 0

    def on_epoch_end(self, result: EpochResult) -> None:
        self.done += 1

    def should_stop(self) -> bool:
        return self.done >= self.epochs


class _PauseAfterSteps(TrainingHooks):
    """Pauses once the run's step count reaches `steps` (never when None); records resumes,
    ended epochs and checkpoints."""

    def __init__(self, steps: int | None = None) -> None:
        self.steps = steps
        self.progress: list[tuple[int, int]] = []
        self.resumed: list[tuple[int, int]] = []
        self.epochs: list[EpochResult] = []
        self.checkpoints = 0

    def on_epoch_end(self, result: EpochResult) -> None:
        self.epochs.append(result)

    def on_checkpoint(self, path: Path) -> None:
        self.checkpoints += 1

    def on_progress(self, done_steps: int, total_steps: int) -> None:
        self.progress.append((done_steps, total_steps))

    def should_pause(self) -> bool:
        return self.steps is not None and self.progress[-1][0] >= self.steps

    def on_resume(self, completed_epochs: int, steps_into_epoch: int) -> None:
        self.resumed.append((completed_epochs, steps_into_epoch))


RESUMABLE = TransferConfig(
    base_model="mobilenet_v3_small",
    strategy="fine_tune",
    num_classes=3,
    image_size=64,
    batch_size=8,
    pretrained=False,
    head=HeadConfig(hidden=(16,), dropout=0.3),
    early_stopping_patience=5,
    stages=(
        StageSpec(groups=("head",), epochs=2, lr=0.01),
        StageSpec(groups=("all",), epochs=3, bn_mode="train", schedule="cosine"),
    ),
)


@pytest.fixture(scope="module")
def uninterrupted(colour_data: Data) -> TrainingResult:
    train, val = colour_data
    return run(compile_plan(RESUMABLE), train=train, val=val, classes=["r", "g", "b"])


@pytest.mark.parametrize(
    "stop_after",
    [1, 2, 4],
    ids=["mid-cached-stage", "stage-boundary", "mid-fine-tune-stage"],
)
def test_resumed_run_ends_with_exactly_the_same_weights(
    tmp_path: Path, colour_data: Data, uninterrupted: TrainingResult, stop_after: int
) -> None:
    checkpoint = tmp_path / "checkpoint.pt"
    with pytest.raises(TrainingCancelled):
        _run_resumable(colour_data, checkpoint, _StopAfterEpochs(stop_after))
    state = torch.load(checkpoint, weights_only=True)
    assert len(state["history"]) == stop_after
    assert [group["name"] for group in state["param_groups"]] == (
        ["head"] if stop_after <= 2 else ["stem", "features.1", "features.2-3", "features.4-8",
                                          "features.9-12", "head"]
    )  # fmt: skip

    hooks = _PauseAfterSteps()
    resumed = _run_resumable(colour_data, checkpoint, hooks, resume=True)

    assert hooks.resumed == [(stop_after, 0)]
    _assert_same_run(resumed, uninterrupted)


def _run_resumable(
    data: Data, checkpoint: Path, hooks: TrainingHooks, *, resume: bool = False
) -> TrainingResult:
    """RESUMABLE on the colour data, checkpointing to (and, with `resume`, from) `checkpoint`."""
    train, val = data
    return run(
        compile_plan(RESUMABLE),
        train=train,
        val=val,
        classes=["r", "g", "b"],
        hooks=hooks,
        checkpoint_path=checkpoint,
        resume_from=checkpoint if resume else None,
    )


def _assert_same_run(resumed: TrainingResult, uninterrupted: TrainingResult) -> None:
    expected = uninterrupted.model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in resumed.model.state_dict().items())

    def losses(result: TrainingResult) -> list[tuple[float, float, float]]:
        return [(r.train_loss, r.val_loss, r.val_accuracy) for r in result.history]

    assert losses(resumed) == losses(uninterrupted)
    assert resumed.metrics == uninterrupted.metrics


# RESUMABLE trains 24 images in batches of 8: 3 steps an epoch, 6 in the cached head stage
# (epochs 1-2) and 9 in the fine-tuning stage (epochs 3-5).
@pytest.mark.parametrize(
    ("pause_after", "completed_epochs", "steps_into_epoch"),
    [(2, 0, 2), (5, 1, 2), (6, 1, 3), (8, 2, 2), (11, 3, 2)],
    ids=[
        "first-epoch",
        "cached-stage-second-epoch",
        "after-an-epochs-last-step",
        "fine-tune-stage-first-epoch",
        "fine-tune-stage-second-epoch",
    ],
)
def test_run_paused_mid_epoch_resumes_at_the_next_step(
    tmp_path: Path,
    colour_data: Data,
    uninterrupted: TrainingResult,
    pause_after: int,
    completed_epochs: int,
    steps_into_epoch: int,
) -> None:
    checkpoint = tmp_path / "checkpoint.pt"
    with pytest.raises(TrainingPaused):
        _run_resumable(colour_data, checkpoint, _PauseAfterSteps(pause_after))
    state = torch.load(checkpoint, weights_only=True)
    assert (state["stage_index"], state["epoch"], state["stage_done"]) == (
        int(completed_epochs >= 2),
        completed_epochs if completed_epochs < 2 else completed_epochs - 2,
        False,
    )
    assert len(state["history"]) == completed_epochs
    assert state["partial"]["steps"] == steps_into_epoch
    assert state["partial"]["samples"] == 8 * steps_into_epoch

    hooks = _PauseAfterSteps()
    resumed = _run_resumable(colour_data, checkpoint, hooks, resume=True)

    assert hooks.resumed == [(completed_epochs, steps_into_epoch)]
    assert hooks.progress[0] == (pause_after + 1, 15)
    assert hooks.progress[-1] == (15, 15)
    _assert_same_run(resumed, uninterrupted)


def test_run_paused_twice_in_one_epoch_resumes_exactly(
    tmp_path: Path, colour_data: Data, uninterrupted: TrainingResult
) -> None:
    plan = compile_plan(RESUMABLE)
    checkpoint = tmp_path / "checkpoint.pt"
    train, val = colour_data
    with pytest.raises(TrainingPaused):
        _run_resumable(colour_data, checkpoint, _PauseAfterSteps(10))
    hooks = _PauseAfterSteps(11)
    with pytest.raises(TrainingPaused):
        _run_resumable(colour_data, checkpoint, hooks, resume=True)
    assert hooks.progress == [(11, 15)]
    assert torch.load(checkpoint, weights_only=True)["partial"]["steps"] == 2

    resumed = run(
        plan,
        train=train,
        val=val,
        classes=["r", "g", "b"],
        checkpoint_path=checkpoint,
        resume_from=checkpoint,
    )

    _assert_same_run(resumed, uninterrupted)


# With its 24 training images known, RESUMABLE's 2-epoch cached head stage makes 9 passes of
# 3 steps each epoch (27 steps, 54 in the stage; FEW_SHOT_HEAD_STEPS is 50); the fine-tuning
# stage keeps 3 steps an epoch: 63 steps in all.
FEW_SHOT = replace(RESUMABLE, train_size=24, feature_views=2)


@pytest.mark.parametrize("augment", ["none", "light"], ids=["plain", "augmented-views"])
def test_run_paused_inside_a_later_pass_resumes_exactly(
    tmp_path: Path, colour_data: Data, augment: str
) -> None:
    plan = compile_plan(replace(FEW_SHOT, augment=augment))
    assert [stage.passes for stage in plan.stages] == [9, 1]
    train, val = colour_data

    def go(hooks: TrainingHooks, checkpoint: Path, *, resume: bool = False) -> TrainingResult:
        return run(
            plan,
            train=train,
            val=val,
            classes=["r", "g", "b"],
            hooks=hooks,
            checkpoint_path=checkpoint,
            resume_from=checkpoint if resume else None,
        )

    whole = _PauseAfterSteps()
    uninterrupted = go(whole, tmp_path / "uninterrupted.pt")
    # Passes stay inside the epoch: one validation, one event and one checkpoint per epoch.
    assert [(entry.stage_index, entry.epoch) for entry in whole.epochs] == [
        (0, 1), (0, 2), (1, 1), (1, 2), (1, 3)
    ]  # fmt: skip
    assert whole.checkpoints == 5
    assert whole.progress == [(step, 63) for step in range(1, 64)]

    # Step 5 of the first epoch is the second of its second pass.
    checkpoint = tmp_path / "checkpoint.pt"
    with pytest.raises(TrainingPaused):
        go(_PauseAfterSteps(5), checkpoint)
    state = torch.load(checkpoint, weights_only=True)
    assert (state["stage_index"], state["epoch"], state["partial"]["steps"]) == (0, 0, 5)

    hooks = _PauseAfterSteps()
    resumed = go(hooks, checkpoint, resume=True)

    assert hooks.resumed == [(0, 5)]
    assert hooks.progress[0] == (6, 63)
    _assert_same_run(resumed, uninterrupted)


def test_pause_without_a_checkpoint_path_still_stops(
    tmp_path: Path,
    make_config: Callable[..., TransferConfig],
    colour_data: Data,
    classes: list[str],
) -> None:
    hooks = _PauseAfterSteps(1)
    train, val = colour_data

    with pytest.raises(TrainingPaused):
        run(compile_plan(make_config()), train=train, val=val, classes=classes, hooks=hooks)

    assert hooks.progress == [(1, 6)]


def test_cancel_wins_over_pause(
    make_config: Callable[..., TransferConfig], colour_data: Data, classes: list[str]
) -> None:
    class CancelAndPause(TrainingHooks):
        def should_stop(self) -> bool:
            return True

        def should_pause(self) -> bool:
            return True

    train, val = colour_data
    plan = compile_plan(make_config())

    with pytest.raises(TrainingCancelled):
        run(plan, train=train, val=val, classes=classes, hooks=CancelAndPause())


def test_resume_refuses_another_plans_checkpoint(
    tmp_path: Path,
    make_config: Callable[..., TransferConfig],
    colour_data: Data,
    classes: list[str],
) -> None:
    train, val = colour_data
    checkpoint = tmp_path / "checkpoint.pt"
    run(
        compile_plan(make_config(epochs=1)),
        train=train,
        val=val,
        classes=classes,
        checkpoint_path=checkpoint,
    )

    with pytest.raises(ValueError, match="different plan"):
        run(
            compile_plan(make_config(epochs=2)),
            train=train,
            val=val,
            classes=classes,
            resume_from=checkpoint,
        )


CHECKPOINT_KEYS = {
    "plan",
    "stage_index",
    "epoch",
    "stage_done",
    "model",
    "optimizer",
    "scheduler",
    "scaler",
    "param_groups",
    "history",
    "early_stopping",
    "rng",
}


@pytest.mark.parametrize(
    ("make_hooks", "stopped_by", "extra_keys"),
    [
        (lambda: _StopAfterEpochs(1), TrainingCancelled, set()),
        (lambda: _PauseAfterSteps(2), TrainingPaused, {"partial"}),
    ],
    ids=["epoch-end", "paused"],
)
def test_checkpoint_keeps_the_layout_paused_jobs_resume_from(
    tmp_path: Path,
    colour_data: Data,
    make_hooks: Callable[[], TrainingHooks],
    stopped_by: type[Exception],
    extra_keys: set[str],
) -> None:
    """Jobs checkpointed by a deployed worker resume on the next one: the keys it reads stay."""
    checkpoint = tmp_path / "checkpoint.pt"
    with pytest.raises(stopped_by):
        _run_resumable(colour_data, checkpoint, make_hooks())

    state = torch.load(checkpoint, weights_only=True)
    assert set(state) == CHECKPOINT_KEYS | extra_keys
    assert set(state["early_stopping"]) == {
        "best_loss",
        "best_state",
        "kept",
        "epochs_without_improvement",
    }
    assert {"python", "numpy", "torch", "shuffle"} <= set(state["rng"])
    if extra_keys:
        assert set(state["partial"]) == {"steps", "loss_sum", "samples", "epoch_start_rng"}


def _checkpoint_at(stage_index: int, epoch: int, **moment: Any) -> dict[str, Any]:
    """A checkpoint's entries that decide where a run resumes; the rest are placeholders."""
    return {
        "stage_index": stage_index,
        "epoch": epoch,
        "model": {},
        "optimizer": {"state": "optimizer"},
        "scheduler": {"state": "scheduler"},
        "scaler": {"state": "scaler"},
        "param_groups": [{"name": "head", "parameters": [(3, 16)]}],
        "history": [],
        "early_stopping": {"epochs_without_improvement": 1},
        "rng": {"stream": "at checkpoint"},
        **moment,
    }


def test_resume_state_restores_the_random_streams_where_each_checkpoint_took_them() -> None:
    source = Path("checkpoint.pt")
    after_stage = ResumeState.from_checkpoint(_checkpoint_at(0, 2, stage_done=True), source)
    after_epoch = ResumeState.from_checkpoint(_checkpoint_at(1, 1, stage_done=False), source)
    partial = {"steps": 2, "loss_sum": 1.5, "samples": 16, "epoch_start_rng": {"stream": "start"}}
    paused = ResumeState.from_checkpoint(
        _checkpoint_at(1, 1, stage_done=False, partial=partial), source
    )

    assert (after_stage.stage_index, after_stage.stage_start) == (
        1,
        StageStart(rng_before_setup={"stream": "at checkpoint"}, source=source),
    )
    assert after_stage.ended_stage

    assert (after_epoch.stage_index, after_epoch.stage_start.first_epoch) == (1, 2)
    assert after_epoch.stage_start.rng_before_setup is None
    assert after_epoch.stage_start.rng_after_setup == {"stream": "at checkpoint"}
    assert after_epoch.stage_start.training is not None
    assert after_epoch.stage_start.training.epochs_without_improvement == 1
    assert after_epoch.stage_start.paused is None
    assert not after_epoch.ended_stage

    assert (paused.stage_index, paused.stage_start.first_epoch, paused.steps_into_epoch) == (
        1,
        2,
        2,
    )
    assert paused.stage_start.rng_before_setup is None
    assert paused.stage_start.rng_after_setup is None
    assert paused.stage_start.paused == PausedEpoch(
        steps=2,
        loss_sum=1.5,
        samples=16,
        epoch_start_rng={"stream": "start"},
        rng_at_pause={"stream": "at checkpoint"},
    )
