"""One run on two CPU processes (gloo) takes the steps one process takes on the same batches."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

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
    compile_plan,
    run,
)

Data = tuple[list[Sample], list[Sample]]

CLASSES = ["r", "g", "b"]

# 23 training images in batches of 8: 3 steps an epoch whose last batch (7) splits 3 + 4, so
# the ranks' unequal shares are part of every epoch. A cached-feature head stage, then the whole
# network (BatchNorm frozen, as by default), no dropout: nothing draws per rank.
CONFIG = TransferConfig(
    base_model="mobilenet_v3_small",
    strategy="fine_tune",
    num_classes=3,
    image_size=64,
    batch_size=8,
    pretrained=False,
    seed=3,
    head=HeadConfig(hidden=(16,)),
    stages=(
        StageSpec(groups=("head",), epochs=1, lr=0.01),
        StageSpec(groups=("all",), epochs=2, lr=0.003, schedule="cosine"),
    ),
)
STEPS = 9


class _Recorder(TrainingHooks):
    """Records what the run reports; pauses or stops once `pause_after`/`stop_after` steps ran."""

    def __init__(self, *, pause_after: int | None = None, stop_after: int | None = None) -> None:
        self.pause_after = pause_after
        self.stop_after = stop_after
        self.epochs: list[EpochResult] = []
        self.checkpoints = 0
        self.steps = 0
        self.resumed: list[tuple[int, int]] = []

    def on_epoch_end(self, result: EpochResult) -> None:
        self.epochs.append(result)

    def on_checkpoint(self, path: Path) -> None:
        self.checkpoints += 1

    def on_progress(self, done_steps: int, total_steps: int) -> None:
        self.steps = done_steps

    def on_resume(self, completed_epochs: int, steps_into_epoch: int) -> None:
        self.resumed.append((completed_epochs, steps_into_epoch))

    def should_stop(self) -> bool:
        return self.stop_after is not None and self.steps >= self.stop_after

    def should_pause(self) -> bool:
        return self.pause_after is not None and self.steps >= self.pause_after


@pytest.fixture(scope="module")
def data(colour_data: Data) -> Data:
    train, val = colour_data
    return train[:23], val


def _run(
    data: Data,
    *,
    gpus: int,
    hooks: TrainingHooks | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
) -> TrainingResult:
    train, val = data
    return run(
        compile_plan(replace(CONFIG, gpus=gpus)),
        train=train,
        val=val,
        classes=CLASSES,
        hooks=hooks,
        checkpoint_path=checkpoint,
        resume_from=checkpoint if resume else None,
    )


@pytest.fixture(scope="module")
def one_process(data: Data) -> TrainingResult:
    return _run(data, gpus=1)


def _assert_same_steps(result: TrainingResult, expected: TrainingResult) -> None:
    """The same weights and history within float rounding (the gradient is summed in another
    order), and the same predictions."""
    wanted = expected.model.state_dict()
    for name, tensor in result.model.state_dict().items():
        torch.testing.assert_close(
            tensor,
            wanted[name],
            rtol=1e-5,
            atol=2e-5,
            msg=lambda text, name=name: f"{name}: {text}",
        )
    for got, want in zip(result.history, expected.history, strict=True):
        assert got.train_loss == pytest.approx(want.train_loss, rel=1e-5)
        assert got.val_loss == pytest.approx(want.val_loss, rel=1e-5)
        assert got.val_accuracy == want.val_accuracy
    assert result.metrics["confusion_matrix"] == expected.metrics["confusion_matrix"]


def test_two_processes_paused_and_resumed_reach_the_weights_of_one(
    tmp_path: Path, data: Data, one_process: TrainingResult
) -> None:
    """Every step runs on two processes, before the pause or after the resume (one run of
    each: a spawn is most of this module's time), and together they end where one process
    does."""
    checkpoint = tmp_path / "checkpoint.pt"
    # Step 5 is the second of the fine-tuning stage's first epoch.
    before = _Recorder(pause_after=5)
    with pytest.raises(TrainingPaused):
        _run(data, gpus=2, hooks=before, checkpoint=checkpoint)
    state = torch.load(checkpoint, weights_only=True)
    assert (state["stage_index"], state["partial"]["steps"]) == (1, 2)
    assert state["partial"]["samples"] == 16

    after = _Recorder()
    resumed = _run(data, gpus=2, hooks=after, checkpoint=checkpoint, resume=True)

    assert after.resumed == [(1, 2)]
    _assert_same_steps(resumed, one_process)
    # The calling process is rank 0, the only one that reports and checkpoints: each epoch
    # once, a checkpoint per epoch and one at the pause.
    assert [epoch.global_epoch for epoch in before.epochs + after.epochs] == [1, 2, 3]
    assert (before.checkpoints, after.checkpoints) == (2, 2)
    assert (before.steps, after.steps) == (5, STEPS)
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 2


def test_a_cancel_stops_every_rank(tmp_path: Path, data: Data) -> None:
    hooks = _Recorder(stop_after=2)
    with pytest.raises(TrainingCancelled):
        _run(data, gpus=2, hooks=hooks, checkpoint=tmp_path / "checkpoint.pt")
    # `run` returned only after the other rank exited; rank 0 stopped at the asked step.
    assert hooks.steps == 2


def test_the_batch_must_split_evenly_over_the_processes() -> None:
    with pytest.raises(ValueError, match=r"^gpus: batch_size 8 does not split evenly over 3"):
        compile_plan(replace(CONFIG, gpus=3))
    assert compile_plan(replace(CONFIG, gpus=4)).gpus == 4
