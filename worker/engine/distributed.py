"""One run on several processes (`plan.gpus` > 1): PyTorch DistributedDataParallel on one host.

The process layout, torchrun-style but started by `run` itself, so a notebook and the worker
call `run` the same way:
- The calling process is rank 0. It opens a TCP rendezvous on a free local port, spawns ranks
  1..N-1 (`torch.multiprocessing`, spawn), joins the process group (nccl on CUDA, one GPU per
  rank; gloo on the CPU) and trains with the caller's hooks. Its result is `run`'s result.
- Every rank builds the same model, data and shuffle stream from the plan's seed, so each
  draws the same global batches in the same order (augmentation included). A rank keeps its
  contiguous slice of each global batch (batch_size / N rows; a short last batch splits as
  evenly as it can), and DDP's gradient all-reduce weighs each rank by its share of the
  batch: the summed gradient is the global batch's, so N processes take the steps one
  process would, within float rounding. The loss a rank reports is the global batch's mean.
  What draws from the global torch stream inside the model (dropout) draws per rank, so with
  dropout the runs agree in distribution, not to the bit.
- Only rank 0 has the caller's hooks and checkpoint path: it alone writes checkpoints,
  events and progress, and the caller publishes its result once. Rank 0 answers
  `should_stop`/`should_pause` once per step and broadcasts the answer, so a cancel or a
  SIGTERM pause ends every rank at the same step boundary; a resumed run reads the
  checkpoint on every rank (the same file on this host).
- Everything else runs on every rank unchanged and identically: the feature cache (each rank
  computes all features itself; no exchange, the same wall time as one process), LwF's
  recording, evaluation, early stopping. BatchNorm is not converted to SyncBatchNorm: stages
  that train the backbone default to `bn_mode: frozen` and feature-cache stages keep
  BatchNorm frozen, so its statistics are fixed; with `bn_mode: train` each rank normalises
  over its slice and rank 0's running statistics are copied to every rank after each epoch.
"""

import datetime
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.multiprocessing.spawn import ProcessException
from torch.nn.parallel import DistributedDataParallel

from .loop import TrainingCancelled, TrainingHooks, TrainingPaused

logger = logging.getLogger(__name__)

RENDEZVOUS_HOST = "127.0.0.1"
GROUP_TIMEOUT = datetime.timedelta(minutes=30)
"""How long a rank waits in a collective: longer than rank 0 may spend between two steps
(uploading a checkpoint), so only a rank that died or hung fails the others."""

FAILURE_KEY = "failure"
_STOP, _PAUSE, _ABORT = 1, 2, 3

R = TypeVar("R")


class RankAborted(Exception):  # noqa: N818 - read as an event, like TrainingCancelled
    """Rank 0 failed (its hooks raised); the other ranks stop where they are."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run's process group."""

    rank: int
    world: int
    device: torch.device

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def bounds(self, total: int) -> tuple[int, int]:
        """This rank's rows of a global batch of `total`: contiguous, sizes differing by <= 1."""
        return total * self.rank // self.world, total * (self.rank + 1) // self.world


def current_ranks(device: torch.device) -> Ranks | None:
    """This process's ranks when it runs inside a process group, else None."""
    if not dist.is_initialized():
        return None
    if device.type == "cuda":
        # `launch` made this rank's GPU the current one.
        device = torch.device("cuda", torch.cuda.current_device())
    return Ranks(dist.get_rank(), dist.get_world_size(), device)


def backend_for(device: str) -> str:
    return "nccl" if device == "cuda" else "gloo"


def launch(
    target: Callable[..., R],
    *,
    world: int,
    device: str,
    hooks: TrainingHooks | None,
    checkpoint_path: Path | None,
    shared: dict[str, Any],
) -> R:
    """Run `target(hooks=, checkpoint_path=, **shared)` on `world` ranks; rank 0's result.

    `shared` goes to every rank (pickled once per spawned rank); `hooks` and `checkpoint_path`
    only to rank 0 here, the others get neither.
    """
    if device == "cuda" and torch.cuda.device_count() < world:
        raise ValueError(
            f"gpus: the plan asks for {world} GPUs; this host has {torch.cuda.device_count()}"
        )
    store = dist.TCPStore(
        RENDEZVOUS_HOST, 0, world, is_master=True, timeout=GROUP_TIMEOUT, wait_for_workers=False
    )
    logger.info("starting %d ranks (%s), rendezvous on port %d", world, device, store.port)
    spawned = mp.start_processes(
        _spawned_rank,
        args=(target, world, device, store.port, torch.get_num_threads(), shared),
        nprocs=world - 1,
        join=False,
        start_method="spawn",
    )
    try:
        _await_ranks(store, spawned, world)
        _join_group(store, rank=0, world=world, device=device)
        try:
            result = target(hooks=hooks, checkpoint_path=checkpoint_path, **shared)
        finally:
            dist.destroy_process_group()
    except (TrainingPaused, TrainingCancelled):
        # Every rank stopped at the same step (the answer was broadcast) and exits by itself.
        _wait(spawned)
        raise
    except BaseException:
        _stop(spawned)
        # A rank that failed first is what rank 0 saw as a reset connection: name its error.
        if store.check([FAILURE_KEY]):
            raise RuntimeError(store.get(FAILURE_KEY).decode()) from None
        raise
    _wait(spawned)
    return result


def _stop(spawned: mp.ProcessContext) -> None:
    """End the spawned ranks (SIGKILL: they ignore SIGTERM, and write nothing to lose)."""
    for process in spawned.processes:
        if process.is_alive():
            process.kill()
    for process in spawned.processes:
        process.join()


def _await_ranks(store: dist.TCPStore, spawned: mp.ProcessContext, world: int) -> None:
    """Until every spawned rank has reached the rendezvous; raises at once if one failed
    before (rather than rank 0 waiting out the group's timeout); its traceback is logged."""
    arrived = [_arrived(rank) for rank in range(1, world)]
    try:
        while not store.check(arrived):
            spawned.join(timeout=0.1)
    except ProcessException as failed:
        raise RuntimeError(f"rank {failed.error_index + 1} of {world} did not start") from None


def _arrived(rank: int) -> str:
    return f"arrived/{rank}"


def _wait(spawned: mp.ProcessContext) -> None:
    """Until every spawned rank has exited; raises if one failed."""
    while not spawned.join():
        pass


def _join_group(store: dist.Store, *, rank: int, world: int, device: str) -> None:
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend_for(device), store=store, rank=rank, world_size=world, timeout=GROUP_TIMEOUT
    )


def _spawned_rank(
    index: int,
    target: Callable[..., Any],
    world: int,
    device: str,
    port: int,
    threads: int,
    shared: dict[str, Any],
) -> None:
    """Rank `index + 1`: trains without hooks or checkpoint, and ends quietly when rank 0
    pauses, cancels or fails."""
    # A SIGTERM or Ctrl-C sent to the worker's whole process group is rank 0's to act on (it
    # pauses every rank at the next step); a rank that died of it would fail the job instead.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    store = dist.TCPStore(RENDEZVOUS_HOST, port, world, is_master=False, timeout=GROUP_TIMEOUT)
    store.set(_arrived(index + 1), "1")
    _join_group(store, rank=index + 1, world=world, device=device)
    try:
        target(hooks=None, checkpoint_path=None, **shared)
    except (TrainingPaused, TrainingCancelled, RankAborted):
        pass
    except BaseException as exc:
        # Written before this rank leaves the group, so before rank 0 can see it gone.
        store.set(FAILURE_KEY, f"rank {index + 1} of {world} failed: {type(exc).__name__}: {exc}")
        raise
    finally:
        dist.destroy_process_group()


class RankHooks(TrainingHooks):
    """The hooks every rank trains with: rank 0 forwards to the caller's and decides for all.

    `should_stop` is the one question asked at every step boundary (and between batches of
    the feature cache and LwF's recording), on every rank at the same points, so it carries
    both answers: rank 0 asks its hooks whether to stop and whether to pause and broadcasts
    one flag; `should_pause` (asked right after it) reads the pause from that flag.
    """

    def __init__(self, ranks: Ranks, hooks: TrainingHooks | None) -> None:
        self.ranks = ranks
        self.hooks = hooks if hooks is not None else TrainingHooks()
        self._pause = False

    def should_stop(self) -> bool:
        flag = torch.zeros(1, dtype=torch.int32, device=self.ranks.device)
        if self.ranks.leader:
            try:
                flag[0] = (
                    _STOP
                    if self.hooks.should_stop()
                    else _PAUSE
                    if self.hooks.should_pause()
                    else 0
                )
            except BaseException:
                flag[0] = _ABORT
                dist.broadcast(flag, 0)
                raise
        dist.broadcast(flag, 0)
        answer = int(flag.item())
        if answer == _ABORT:
            raise RankAborted("rank 0 failed")
        self._pause = answer == _PAUSE
        return answer == _STOP

    def should_pause(self) -> bool:
        return self._pause

    def on_epoch_end(self, result: Any) -> None:
        if self.ranks.leader:
            self.hooks.on_epoch_end(result)

    def on_progress(self, done_steps: int, total_steps: int) -> None:
        if self.ranks.leader:
            self.hooks.on_progress(done_steps, total_steps)

    def on_resume(self, completed_epochs: int, steps_into_epoch: int) -> None:
        if self.ranks.leader:
            self.hooks.on_resume(completed_epochs, steps_into_epoch)

    def on_checkpoint(self, path: Path) -> None:
        if self.ranks.leader:
            self.hooks.on_checkpoint(path)


class _Slice:
    """The current step's global batch size and this rank's rows of it."""

    def __init__(self, ranks: Ranks) -> None:
        self.ranks = ranks
        self.total = 0
        self.rows = slice(0, 0)

    def cut(self, batch: Tensor) -> Tensor:
        return batch[self.rows]

    @property
    def share(self) -> float:
        return (self.rows.stop - self.rows.start) / self.total


class _RowsOfThisRank(nn.Module):
    """Takes a global batch and runs `module` on this rank's rows of it."""

    def __init__(self, module: nn.Module, rows: _Slice) -> None:
        super().__init__()
        self.module = module
        self.rows = rows

    def forward(self, inputs: Tensor) -> Any:
        self.rows.total = len(inputs)
        self.rows.rows = slice(*self.rows.ranks.bounds(len(inputs)))
        return self.module(self.rows.cut(inputs))


class _GlobalBatchLoss(nn.Module):
    """The loss of this rank's rows, whose value is the global batch's mean loss.

    Backward differentiates this rank's own mean loss; DDP's all-reduce then weighs it by the
    rank's share of the batch (`_weighted_sum`), which together make the global mean's
    gradient. The value is all-reduced so the epoch's reported loss (and a mid-epoch
    checkpoint's running sum) is the same on every rank and equal to one process's.
    """

    def __init__(self, loss_fn: nn.Module, rows: _Slice) -> None:
        super().__init__()
        self.loss_fn = loss_fn
        self.rows = rows

    def forward(self, outputs: Tensor | list[Tensor], targets: Tensor | Sequence[Tensor]) -> Tensor:
        if self.rows.rows.stop == self.rows.rows.start:
            # A last batch smaller than the world: this rank still joins the all-reduce, with a
            # zero gradient (the mean of no rows would be NaN).
            parts = outputs if isinstance(outputs, list) else [outputs]
            local = sum((part.sum() for part in parts), torch.zeros((), device=parts[0].device))
        else:
            mine = (
                self.rows.cut(targets)
                if isinstance(targets, Tensor)
                else [self.rows.cut(part) for part in targets]
            )
            local = self.loss_fn(outputs, mine)
        weighted = local.detach().float() * self.rows.share
        dist.all_reduce(weighted)
        return local + (weighted - local).detach()


def _weighted_sum(rows: _Slice, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP communication hook: sum the ranks' gradients, each weighted by its share of rows
    (DDP's default divides by the world size, right only for equal shares)."""
    tensor = bucket.buffer().mul_(rows.share)
    work = dist.all_reduce(tensor, async_op=True)
    assert work is not None
    return work.get_future().then(lambda done: done.value()[0])


def shard(ranks: Ranks, trained: nn.Module, loss_fn: nn.Module) -> tuple[nn.Module, nn.Module]:
    """A stage's module and loss for this rank: both take the global batch, as in one process.

    Made per stage, after the stage's freezing, because DDP reduces the gradients of the
    parameters that require them when it is built.
    """
    rows = _Slice(ranks)
    parallel = DistributedDataParallel(
        _RowsOfThisRank(trained, rows),
        device_ids=[ranks.device.index] if ranks.device.type == "cuda" else None,
        # Rank 0's BatchNorm statistics are copied once an epoch (`sync_buffers`), not every step.
        forward_sync_buffers=False,
        # Stages train parts of the model (an LwF head, the LM head): those without a
        # gradient in a step must not hold up the reduction.
        find_unused_parameters=True,
    )
    parallel.register_comm_hook(rows, _weighted_sum)
    return parallel, _GlobalBatchLoss(loss_fn, rows)


def sync_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm statistics that trained this epoch) to every rank, so
    all ranks evaluate, stop early and continue with the same model."""
    for buffer in model.buffers():
        dist.broadcast(buffer, 0)
