"""`thaw serve` keeps its worker processes running, and says how they are doing.

- `Supervisor` starts each worker and starts it again when it dies, after a delay that doubles
  from `RESTART_DELAY_SECONDS` to `MAX_RESTART_DELAY_SECONDS` while it keeps dying young (back
  to the first once one ran `STABLE_SECONDS`), with a log line each time. It drops a dead
  worker's announcements from the live-queue registry at once (`queues.ConsumerRegistry`), so
  `/readyz` shows the gap until the new process announces itself, and it keeps the restart
  count per worker in a small file of the data folder, which every API process reads at a scrape
  (`WorkerRestarts`): `/metrics` reports it whichever process answers.
- `stranded_queues`: the queues that have work and no live worker, which `/readyz` reports.

A fleet has no supervisor: its orchestrator restarts the containers (docker-compose.yml's
`restart:`), and `/metrics` has no restart series.
"""

import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from service.context import AppContext
from service.jobs.states import ACTIVE_STATUSES
from service.queues import DATASETS_QUEUE, ConsumerRegistry
from service.settings import Settings
from service.tables import Dataset, Job

logger = logging.getLogger(__name__)

RESTART_DELAY_SECONDS = 1.0
MAX_RESTART_DELAY_SECONDS = 60.0
STABLE_SECONDS = 60.0
"""A worker that ran this long before dying is restarted after the first delay again: it was
not crashing at start-up."""


def restarts_file(settings: Settings) -> Path:
    return settings.data_dir.resolve() / "worker-restarts.json"


@dataclass(frozen=True)
class SupervisedWorker:
    name: str
    """The worker's short name (`train`, `datasets`): the metric's label."""
    node: str
    """Its Celery node name (`train@host`), as it announces itself in the registry."""
    command: list[str]


class Supervisor:
    def __init__(
        self, workers: list[SupervisedWorker], *, registry: ConsumerRegistry, counts: Path
    ) -> None:
        self.workers = workers
        self.registry = registry
        self.counts = counts
        self.restarts = {worker.name: 0 for worker in workers}
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._started: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._watchers: list[threading.Thread] = []

    def start(self) -> None:
        with self._lock:
            self._write_counts()
            for worker in self.workers:
                self._spawn(worker)
        for worker in self.workers:
            watcher = threading.Thread(
                target=self._watch, args=(worker,), name=f"supervise-{worker.name}", daemon=True
            )
            watcher.start()
            self._watchers.append(watcher)

    def process(self, name: str) -> subprocess.Popen[bytes]:
        with self._lock:
            return self._processes[name]

    def _spawn(self, worker: SupervisedWorker) -> None:
        # A session of its own: a terminal's Ctrl-C reaches `thaw serve` alone, which then
        # stops the workers in order (SIGTERM: a training job is handed back at a checkpoint).
        self._processes[worker.name] = subprocess.Popen(worker.command, start_new_session=True)
        self._started[worker.name] = time.monotonic()

    def _watch(self, worker: SupervisedWorker) -> None:
        delay = RESTART_DELAY_SECONDS
        while True:
            with self._lock:
                process = self._processes[worker.name]
                started = self._started[worker.name]
            code = process.wait()
            if self._stopping.is_set():
                return
            try:
                self.registry.forget(worker.node)
            except Exception as exc:
                logger.warning("could not drop %s from the queue registry: %s", worker.node, exc)
            if time.monotonic() - started >= STABLE_SECONDS:
                delay = RESTART_DELAY_SECONDS
            logger.warning(
                "worker %s (pid %d) %s; restarting it in %.0f s (restart %d)",
                worker.name,
                process.pid,
                _how_it_ended(code),
                delay,
                self.restarts[worker.name] + 1,
            )
            if self._stopping.wait(delay):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                self._spawn(worker)
                self.restarts[worker.name] += 1
                self._write_counts()
            delay = min(2 * delay, MAX_RESTART_DELAY_SECONDS)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every worker and wait for them (SIGKILL after `timeout`); none restarts."""
        with self._lock:
            self._stopping.set()
            processes = list(self._processes.values())
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                # A training worker hands its job back after the current step; one busy in a
                # step-less phase (caching features) is killed, and its lease re-queues the job.
                process.kill()
                process.wait()
        for watcher in self._watchers:
            watcher.join(timeout=5)
        # No supervisor, no restart series: a later `thaw api` on this folder reports none.
        self.counts.unlink(missing_ok=True)

    def _write_counts(self) -> None:
        self.counts.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.counts.with_name(f".{self.counts.name}.{os.getpid()}")
        temporary.write_text(json.dumps(self.restarts))
        os.replace(temporary, self.counts)


def _how_it_ended(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def read_restart_counts(path: Path) -> dict[str, int]:
    try:
        counts = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return {str(name): int(count) for name, count in counts.items()}


class WorkerRestarts(Collector):
    """`thaw_worker_restarts_total{worker=...}`, read from the supervisor's file at each scrape."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def collect(self) -> Iterator[Metric]:
        counts = read_restart_counts(self.path)
        if not counts:
            return
        family = CounterMetricFamily(
            "thaw_worker_restarts",
            "Worker processes `thaw serve` started again after they died.",
            labels=["worker"],
        )
        for name, count in sorted(counts.items()):
            family.add_metric([name], count)
        yield family


def stranded_queues(context: AppContext, registry: ConsumerRegistry) -> dict[str, int]:
    """Each queue that has work (active jobs, datasets being ingested) but no live worker,
    with how much work."""
    with context.db.session() as session:
        work: dict[str, int] = dict(
            session.execute(
                select(Job.queue, func.count())
                .where(Job.status.in_(sorted(ACTIVE_STATUSES)))
                .group_by(Job.queue)
            ).all()
        )
        ingesting = session.scalar(
            select(func.count()).select_from(Dataset).where(Dataset.status == "processing")
        )
    if ingesting:
        work[DATASETS_QUEUE] = work.get(DATASETS_QUEUE, 0) + ingesting
    if not work:
        return {}
    live = registry.live()
    return {queue: count for queue, count in sorted(work.items()) if queue not in live}
