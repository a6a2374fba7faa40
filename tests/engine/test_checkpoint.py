"""The checkpoint file and resuming from it, piece by piece, without training a model.

`tests/engine/test_train.py` pauses and resumes real runs and checks that they end exactly as
uninterrupted ones; those take minutes. These tests pin down each part of `checkpoint.py` and
`resume.py` in about a second, which is what makes a mutation run over them affordable
(`scripts/mutation.sh checkpoint resume`).
"""

import logging
import pickle
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader

from worker.engine import EpochResult, Plan, TransferConfig, compile_plan
from worker.engine.checkpoint import (
    checkpoint_state,
    load_checkpoint,
    param_group_layout,
    partial_epoch,
    restore_rng,
    rng_state,
    save_checkpoint,
)
from worker.engine.ema import WeightAverage
from worker.engine.loop import EpochPosition, Evaluation
from worker.engine.optim import EarlyStopping
from worker.engine.resume import PausedEpoch, ResumeState, StageStart, StageTrainingState

CPU = torch.device("cpu")
META = torch.device("meta")


@pytest.fixture(scope="module")
def plan() -> Plan:
    return compile_plan(
        TransferConfig(base_model="resnet18", num_classes=3, pretrained=False, epochs=2)
    )


class _Parts:
    """What `run` holds when it writes a checkpoint: a two-group model and its training state."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
        self.optimizer = torch.optim.SGD(
            [
                {"params": self.model[0].parameters(), "name": "body", "lr": 0.1},
                {"params": self.model[1].parameters(), "name": "head", "lr": 0.5},
            ],
            momentum=0.9,
        )
        self.scheduler = LambdaLR(self.optimizer, lambda step: 1 / (1 + step))
        self.scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
        self.stopping = EarlyStopping(patience=3)
        self.shuffle = torch.Generator().manual_seed(seed)
        self.ema = WeightAverage(0.9)
        self.ema.start_stage(self.model)

    def step(self) -> None:
        """One training step: moves the weights, the optimizer's momentum and the schedule."""
        loss = self.model(torch.ones(4, 2)).pow(2).sum()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(self.model)

    def state(self, **overrides: Any) -> dict[str, Any]:
        settings: dict[str, Any] = {
            "model": self.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "scaler": self.scaler,
            "history": [_epoch(1)],
            "stopping": self.stopping,
            "shuffle": self.shuffle,
            "stage_index": 1,
            "epoch": 2,
            "stage_done": False,
            **overrides,
        }
        return checkpoint_state(**settings)


def _epoch(number: int) -> EpochResult:
    return EpochResult(
        stage="head",
        stage_index=0,
        epoch=number,
        global_epoch=number,
        train_loss=0.5,
        val_loss=0.25,
        val_accuracy=0.75,
        learning_rates={"head": 0.01},
        seconds=1.5,
    )


def _draws(shuffle: torch.Generator) -> tuple[Any, ...]:
    """One draw from every stream training uses."""
    return (
        random.random(),
        float(np.random.rand()),
        torch.rand(1).item(),
        torch.rand(1, generator=shuffle).item(),
    )


def _round_trip(state: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "state.pt"
    torch.save(state, path)
    loaded: dict[str, Any] = torch.load(path, weights_only=True)
    return loaded


# --- checkpoint.py ------------------------------------------------------------------------------


def test_restoring_the_random_state_repeats_every_streams_draws(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    shuffle = torch.Generator().manual_seed(4)
    _draws(shuffle)  # a state part-way through each stream, not a fresh seed's
    # Stored the way a checkpoint stores it: a file `torch.load(weights_only=True)` reads.
    state = _round_trip(rng_state(shuffle), tmp_path)
    expected = [_draws(shuffle) for _ in range(3)]

    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    other = torch.Generator().manual_seed(9)
    restore_rng(state, other)

    assert [_draws(other) for _ in range(3)] == expected
    streams = {"python", "numpy", "torch", "shuffle"}
    assert set(state) == (streams | {"cuda"} if torch.cuda.is_available() else streams)


def test_a_gpus_streams_are_kept_and_restored_only_where_both_ends_have_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No GPU here, so torch's CUDA stream calls are faked: a GPU machine's checkpoint carries
    every device's stream and a GPU machine puts it back; a CPU machine's checkpoint (no "cuda")
    leaves a GPU's streams alone, and a CPU machine ignores a GPU checkpoint's."""
    cuda_streams = [torch.tensor([1, 2, 3], dtype=torch.uint8)]
    restored: list[Any] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: cuda_streams)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    shuffle = torch.Generator()

    state = rng_state(shuffle)
    assert state["cuda"] is cuda_streams
    restore_rng(state, shuffle)
    assert restored == [cuda_streams]

    restore_rng({key: value for key, value in state.items() if key != "cuda"}, shuffle)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    restore_rng(state, shuffle)
    assert restored == [cuda_streams]


def test_the_optimizer_layout_names_each_group_and_its_parameter_shapes() -> None:
    parts = _Parts()
    assert param_group_layout(parts.optimizer) == [
        {"name": "body", "parameters": [(3, 2), (3,)]},
        {"name": "head", "parameters": [(2, 3), (2,)]},
    ]


def test_a_checkpoint_holds_everything_run_needs_to_continue(plan: Plan) -> None:
    parts = _Parts()
    parts.step()
    shuffle_before = parts.shuffle.get_state()

    state = parts.state(plan=plan)

    assert set(state) == {
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
    assert state["plan"] == plan.to_dict()
    assert (state["stage_index"], state["epoch"], state["stage_done"]) == (1, 2, False)
    assert state["model"].keys() == parts.model.state_dict().keys()
    assert state["optimizer"]["state"]  # the momentum buffers of the step
    assert state["scheduler"]["last_epoch"] == 1
    assert state["scaler"]["scale"] == 8.0
    assert state["param_groups"] == param_group_layout(parts.optimizer)
    assert state["history"] == [_epoch(1).__dict__]
    assert state["early_stopping"] == parts.stopping.state_dict()
    assert torch.equal(state["rng"]["shuffle"], shuffle_before)


def test_a_pause_and_a_weight_average_are_stored_only_when_given(plan: Plan) -> None:
    parts = _Parts()
    partial = partial_epoch(EpochPosition(3, torch.tensor(1.5), 12), {"torch": "start"})
    ema = parts.ema.state_dict()

    state = parts.state(plan=plan, partial=partial, ema=ema)

    assert state["partial"] is partial
    assert state["ema"] is ema
    assert partial == {
        "steps": 3,
        "loss_sum": 1.5,
        "samples": 12,
        "epoch_start_rng": {"torch": "start"},
    }
    assert type(partial["loss_sum"]) is float  # a tensor would need torch to read it back


def test_saving_replaces_the_checkpoint_and_leaves_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "run" / "nested" / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1})
    save_checkpoint(path, {"epoch": 2})  # the folder exists now; the file is replaced

    assert torch.load(path, weights_only=True) == {"epoch": 2}
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]


def test_saving_never_writes_the_checkpoint_itself_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1})
    written: list[str] = []
    save = torch.save

    def crash_while_writing(state: dict[str, Any], target: Path) -> None:
        written.append(Path(target).name)
        save({"half": "written"}, target)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_while_writing)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"epoch": 2})

    assert written == [".checkpoint.pt.partial"]
    assert torch.load(path, weights_only=True) == {"epoch": 1}


def test_a_checkpoint_loads_only_for_the_plan_that_wrote_it(plan: Plan, tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"plan": plan.to_dict(), "epoch": 1})

    assert load_checkpoint(path, plan)["epoch"] == 1
    other = replace(plan, num_classes=4)
    with pytest.raises(ValueError, match=f"^{path} was written for a different plan$"):
        load_checkpoint(path, other)


def test_a_checkpoint_naming_its_parent_by_host_path_still_loads(
    plan: Plan, tmp_path: Path
) -> None:
    # Written before parents were named by key: "parent_dir" and no "parent".
    with_parent = replace(plan, parent="models/7")
    stored = {k: v for k, v in with_parent.to_dict().items() if k != "parent"}
    stored["parent_dir"] = "/old/host/models/7"
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"plan": stored})

    assert load_checkpoint(path, with_parent)["plan"] == stored
    # A checkpoint of today names its parent, and another parent is another plan.
    save_checkpoint(path, {"plan": with_parent.to_dict()})
    with pytest.raises(ValueError, match="different plan"):
        load_checkpoint(path, replace(plan, parent="models/8"))
    # Only a host path stands for the job's parent: a plan that names none, or names another
    # by key beside an old path, had another parent.
    save_checkpoint(path, {"plan": {k: v for k, v in plan.to_dict().items() if k != "parent"}})
    with pytest.raises(ValueError, match="different plan"):
        load_checkpoint(path, with_parent)
    save_checkpoint(path, {"plan": {**stored, "parent": "models/8"}})
    with pytest.raises(ValueError, match="different plan"):
        load_checkpoint(path, with_parent)


def test_a_checkpoint_written_on_a_gpu_loads_on_the_cpu(
    plan: Plan, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job paused on a GPU worker may resume on a CPU-only one: every tensor comes back on the
    CPU. (The file is written here with its tensors tagged as on "cuda:0", as a GPU's would be.)"""
    path = tmp_path / "checkpoint.pt"
    with monkeypatch.context() as on_a_gpu:
        on_a_gpu.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        save_checkpoint(path, {"plan": plan.to_dict(), "weight": torch.ones(2)})

    state = load_checkpoint(path, plan)
    assert state["weight"].device == CPU
    assert torch.equal(state["weight"], torch.ones(2))


class _Payload:
    """Anything but tensors and plain data: unpickling it would run code the file chose."""


def test_a_checkpoint_holding_arbitrary_objects_is_refused(plan: Plan, tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"plan": plan.to_dict(), "payload": _Payload()})

    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(path, plan)


# --- resume.py ----------------------------------------------------------------------------------


def _loader(shuffle: torch.Generator) -> DataLoader[Any]:
    return DataLoader(list(range(12)), batch_size=2, shuffle=True, generator=shuffle)


def test_a_paused_epoch_continues_with_the_batches_it_had_left_and_the_same_draws() -> None:
    shuffle = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    loader = _loader(shuffle)
    epoch_start = rng_state(shuffle)
    batches = iter(loader)
    done = [next(batches).tolist() for _ in range(2)]
    torch.rand(3)  # the steps' dropout draws
    at_pause = rng_state(shuffle)
    left = [batch.tolist() for batch in batches]
    after = _draws(shuffle)

    paused = PausedEpoch(
        steps=2, loss_sum=0.5, samples=4, epoch_start_rng=epoch_start, rng_at_pause=at_pause
    )
    torch.manual_seed(6)
    shuffle.manual_seed(6)
    remaining = [batch.tolist() for batch in paused.remaining_batches(loader, shuffle)]

    assert remaining == left
    assert len(done) + len(left) == 6
    assert _draws(shuffle) == after


def test_a_paused_epochs_position_is_where_it_stopped() -> None:
    paused = PausedEpoch(steps=3, loss_sum=1.25, samples=12, epoch_start_rng={}, rng_at_pause={})
    position = paused.position(CPU)
    assert (position.steps, position.samples) == (3, 12)
    assert position.loss_sum.item() == 1.25
    # On the training device: "meta" stands for a GPU here, where a CPU tensor would fail.
    assert paused.position(META).loss_sum.device == META


def test_a_checkpoint_at_an_epochs_end_resumes_at_the_next_epoch(
    plan: Plan, tmp_path: Path
) -> None:
    parts = _Parts()
    parts.step()
    parts.stopping.epochs_without_improvement = 2
    state = parts.state(plan=plan, stage_index=1, epoch=2, ema=parts.ema.state_dict())

    resume = ResumeState.from_checkpoint(state, tmp_path / "checkpoint.pt")

    assert resume.source == tmp_path / "checkpoint.pt"
    assert resume.stage_index == 1
    assert resume.ended_stage is False
    assert resume.history == [_epoch(1)]
    assert resume.early_stopping is state["early_stopping"]
    assert resume.model is state["model"]
    assert resume.ema is state["ema"]
    assert resume.steps_into_epoch == 0
    start = resume.stage_start
    assert start.first_epoch == 3
    assert start.rng_before_setup is None
    assert start.rng_after_setup is state["rng"]
    assert start.paused is None
    assert start.source == tmp_path / "checkpoint.pt"
    assert start.training == StageTrainingState(
        param_groups=state["param_groups"],
        optimizer=state["optimizer"],
        scheduler=state["scheduler"],
        scaler=state["scaler"],
        epochs_without_improvement=2,
        ema=state["ema"],
    )


def test_a_checkpoint_at_a_stages_end_resumes_at_the_next_stage(plan: Plan, tmp_path: Path) -> None:
    state = _Parts().state(plan=plan, stage_index=1, epoch=2, stage_done=True)

    resume = ResumeState.from_checkpoint(state, tmp_path / "checkpoint.pt")

    assert resume.stage_index == 2
    assert resume.ended_stage is True
    assert resume.ema is None
    assert resume.stage_start == StageStart(
        rng_before_setup=state["rng"], source=tmp_path / "checkpoint.pt"
    )


def test_a_checkpoint_at_a_pause_resumes_inside_the_paused_epoch(
    plan: Plan, tmp_path: Path
) -> None:
    parts = _Parts()
    partial = partial_epoch(EpochPosition(3, torch.tensor(1.5), 12), {"torch": "start"})
    state = parts.state(plan=plan, stage_index=0, epoch=1, partial=partial)

    resume = ResumeState.from_checkpoint(state, tmp_path / "checkpoint.pt")

    assert resume.stage_index == 0
    assert resume.steps_into_epoch == 3
    start = resume.stage_start
    assert start.first_epoch == 2
    assert start.rng_after_setup is None  # the paused epoch restores the streams itself
    assert start.training is not None
    assert start.paused == PausedEpoch(
        steps=3,
        loss_sum=1.5,
        samples=12,
        epoch_start_rng={"torch": "start"},
        rng_at_pause=state["rng"],
    )


def test_reading_a_checkpoint_checks_its_plan(plan: Plan, tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _Parts().state(plan=plan, stage_done=True))

    resume = ResumeState.read(path, plan)

    assert (resume.source, resume.stage_index) == (path, 2)
    with pytest.raises(ValueError, match="different plan"):
        ResumeState.read(path, replace(plan, num_classes=4))


def test_resuming_inside_a_stage_restores_its_training_state(plan: Plan, tmp_path: Path) -> None:
    written = _Parts(seed=0)
    written.step()
    written.scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    written.stopping.epochs_without_improvement = 2
    state = written.state(plan=plan, ema=written.ema.state_dict())
    expected = _draws(written.shuffle)
    start = ResumeState.from_checkpoint(state, tmp_path / "checkpoint.pt").stage_start

    fresh = _Parts(seed=1)  # a stage set up afresh, as `run` does before restoring
    start.restore_after_setup(
        fresh.optimizer,
        fresh.scheduler,
        fresh.scaler,
        fresh.stopping,
        fresh.shuffle,
        fresh.ema,
    )

    assert fresh.optimizer.state_dict() == written.optimizer.state_dict()
    assert fresh.scheduler.last_epoch == 1
    assert fresh.scaler.get_scale() == 4.0
    assert fresh.stopping.epochs_without_improvement == 2
    assert all(
        torch.equal(fresh.ema.shadow[name], value) for name, value in written.ema.shadow.items()
    )
    assert fresh.ema.updates == 1
    assert _draws(fresh.shuffle) == expected


def test_a_checkpoint_without_an_average_leaves_the_fresh_one(plan: Plan, tmp_path: Path) -> None:
    state = _Parts(seed=0).state(plan=plan)
    start = ResumeState.from_checkpoint(state, tmp_path / "checkpoint.pt").stage_start
    fresh = _Parts(seed=1)
    shadow = {name: value.clone() for name, value in fresh.ema.shadow.items()}

    start.restore_after_setup(
        fresh.optimizer, fresh.scheduler, fresh.scaler, fresh.stopping, fresh.shuffle, fresh.ema
    )
    # A plan without `ema` passes none.
    start.restore_after_setup(
        fresh.optimizer, fresh.scheduler, fresh.scaler, fresh.stopping, fresh.shuffle
    )

    assert all(torch.equal(fresh.ema.shadow[name], value) for name, value in shadow.items())


def test_a_checkpoint_of_other_optimizer_groups_is_refused(plan: Plan, tmp_path: Path) -> None:
    state = _Parts().state(plan=plan)
    state["param_groups"] = [{"name": "head", "parameters": [(2, 3), (2,)]}]
    start = ResumeState.from_checkpoint(state, tmp_path / "checkpoint.pt").stage_start
    fresh = _Parts()

    refused = r"checkpoint\.pt: optimizer groups differ from the plan's$"
    with pytest.raises(ValueError, match=refused):
        start.restore_after_setup(
            fresh.optimizer, fresh.scheduler, fresh.scaler, fresh.stopping, fresh.shuffle
        )


def test_a_new_stage_restores_the_streams_before_its_setup(plan: Plan, tmp_path: Path) -> None:
    written = _Parts()
    state = written.state(plan=plan, stage_done=True)
    expected = _draws(written.shuffle)
    start = ResumeState.from_checkpoint(state, tmp_path / "checkpoint.pt").stage_start
    fresh = _Parts(seed=1)

    start.restore_before_setup(fresh.shuffle)
    assert _draws(fresh.shuffle) == expected
    # Inside a stage, the streams wait for the setup: nothing is restored before it.
    inside = ResumeState.from_checkpoint(written.state(plan=plan), tmp_path / "checkpoint.pt")
    before = rng_state(fresh.shuffle)
    inside.stage_start.restore_before_setup(fresh.shuffle)
    assert torch.equal(rng_state(fresh.shuffle)["torch"], before["torch"])
    assert torch.equal(fresh.shuffle.get_state(), before["shuffle"])


def test_only_the_paused_epoch_skips_its_trained_batches() -> None:
    shuffle = torch.Generator().manual_seed(5)
    loader = _loader(shuffle)
    epoch_start = rng_state(shuffle)
    batches = iter(loader)
    next(batches)
    paused = PausedEpoch(
        steps=1,
        loss_sum=0.5,
        samples=2,
        epoch_start_rng=epoch_start,
        rng_at_pause=rng_state(shuffle),
    )
    left = [batch.tolist() for batch in batches]
    start = StageStart(first_epoch=2, paused=paused)

    remaining, position, start_rng = start.epoch_batches(2, loader, shuffle, CPU)
    assert [batch.tolist() for batch in remaining] == left
    assert (position.steps, position.samples, position.loss_sum.item()) == (1, 2, 0.5)
    assert start_rng is epoch_start

    # The next epoch starts at its first batch, and keeps the streams it starts from.
    before = shuffle.get_state()
    batches_3, position_3, start_rng_3 = start.epoch_batches(3, loader, shuffle, CPU)
    assert torch.equal(start_rng_3["shuffle"], before)
    assert len(list(batches_3)) == 6
    assert (position_3.steps, position_3.samples, position_3.loss_sum.item()) == (0, 0, 0.0)
    # The position's running loss is kept on the training device, resumed or not.
    assert start.epoch_batches(2, loader, shuffle, META)[1].loss_sum.device == META
    assert start.epoch_batches(3, loader, shuffle, META)[1].loss_sum.device == META


def test_restoring_puts_back_the_weights_and_early_stopping(
    plan: Plan, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    written = _Parts(seed=0)
    written.step()
    written.stopping.update(written.model, Evaluation(0.5, 0.75, torch.tensor([1])))
    written.stopping.epochs_without_improvement = 1
    partial = partial_epoch(EpochPosition(3, torch.tensor(1.5), 12), {})
    state = written.state(plan=plan, stage_index=1, epoch=1, partial=partial)
    resume = ResumeState.from_checkpoint(state, tmp_path / "checkpoint.pt")
    fresh = _Parts(seed=1)
    stopping = EarlyStopping(patience=3)

    with caplog.at_level(logging.INFO, logger="worker.engine.resume"):
        history = resume.restore(fresh.model, stopping)  # type: ignore[arg-type]

    assert history == [_epoch(1)]
    assert history is not resume.history  # the run appends to its own list
    assert all(
        torch.equal(fresh.model.state_dict()[name], value)
        for name, value in written.model.state_dict().items()
    )
    assert stopping.state_dict()["best_loss"] == 0.5
    assert stopping.epochs_without_improvement == 1
    assert caplog.messages == [
        f"resuming from {tmp_path / 'checkpoint.pt'} at stage 1 epoch 2 after step 3 of it"
    ]


def test_a_stage_that_ended_resumes_from_its_average_then_its_best_weights(
    plan: Plan, tmp_path: Path
) -> None:
    written = _Parts(seed=0)
    written.step()
    best = {name: value.clone() for name, value in written.model.state_dict().items()}
    written.stopping.update(written.model, Evaluation(0.5, 0.75, torch.tensor([1])))
    written.step()  # the last weights: neither the best nor the average
    average = {name: value.clone() for name, value in written.ema.shadow.items()}
    last = {name: value.clone() for name, value in written.model.state_dict().items()}
    with_ema = written.state(plan=plan, stage_done=True, ema=written.ema.state_dict())

    fresh = _Parts(seed=1)
    ResumeState.from_checkpoint(with_ema, tmp_path / "c.pt").restore(
        fresh.model,  # type: ignore[arg-type]
        EarlyStopping(patience=3),
    )
    assert all(torch.equal(fresh.model.state_dict()[k], v) for k, v in best.items())

    # Without kept best weights, the average is what the stage ended with.
    without_best = written.state(plan=plan, stage_done=True, ema=written.ema.state_dict())
    without_best["early_stopping"] = {**without_best["early_stopping"], "best_state": None}
    ResumeState.from_checkpoint(without_best, tmp_path / "c.pt").restore(
        fresh.model,  # type: ignore[arg-type]
        EarlyStopping(patience=3),
    )
    assert all(torch.equal(fresh.model.state_dict()[k], v) for k, v in average.items())
    assert not all(torch.equal(average[k], v) for k, v in last.items())

    # Inside a stage, neither: the weights are the checkpoint's.
    inside = written.state(plan=plan, ema=written.ema.state_dict())
    ResumeState.from_checkpoint(inside, tmp_path / "c.pt").restore(
        fresh.model,  # type: ignore[arg-type]
        EarlyStopping(patience=3),
    )
    assert all(torch.equal(fresh.model.state_dict()[k], v) for k, v in last.items())
