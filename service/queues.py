"""The task queue as the API and the worker both see it: queue and task names, and the one
Celery configuration. Reliability settings live here and nowhere else (DESIGN §5).

Importing this builds nothing: `create_celery` makes an app (and the folder broker's folders)
when a process first needs one.
"""

import logging
import os
import socket
import threading
import time
from abc import ABC, abstractmethod
from functools import cache
from pathlib import Path

from celery import Celery
from kombu import Queue

from service.errors import ApiError
from service.settings import Settings

logger = logging.getLogger(__name__)

CPU_QUEUE = "cpu"
GPU_QUEUE = "gpu"
DATASETS_QUEUE = "datasets"

TRAIN_TASK = "thaw.train_job"
INGEST_TASK = "thaw.ingest_dataset"
SCORE_UPDATE_TASK = "thaw.score_update"
"""Scores an update's candidate after its job (sent again by the reaper when lost)."""

CONSUMER_HEARTBEAT_SECONDS = 10.0
CONSUMER_TTL_SECONDS = 3 * CONSUMER_HEARTBEAT_SECONDS
"""A worker re-announces the queues it consumes every heartbeat; an announcement lives three
heartbeats, so a worker that died (or lost Redis) is no longer counted after at most that,
or at once when its supervisor (`thaw serve`) saw it die and forgot it."""
_CONSUMERS = "thaw:consumers:"


def worker_identity() -> str:
    """How a worker process names itself as the owner of a lease (a job's, an ingest's)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def create_celery(settings: Settings) -> Celery:
    app = Celery("thaw", broker=settings.resolved_broker_url)
    transport_options: dict[str, object] = {}
    if settings.broker_url is None:
        # Embedded mode: a broker that is only a folder, shared by the API and worker processes.
        folder = settings.broker_folder
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        transport_options = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
            # Without this the transport's broadcast folder lands in the working directory.
            "control_folder": str(folder / "control"),
        }
    app.conf.update(
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        # A task is acknowledged only when it finished, and given back if its worker died, so
        # no accepted job is lost; the job's row decides whether a redelivery may run.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_queues=[Queue(CPU_QUEUE), Queue(GPU_QUEUE), Queue(DATASETS_QUEUE)],
        task_default_queue=CPU_QUEUE,
        task_routes={INGEST_TASK: {"queue": DATASETS_QUEUE}},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    if settings.broker_url is None:
        _bind_queues_once(app, settings.broker_folder)
    return app


def _bind_queues_once(app: Celery, folder: Path) -> None:
    """Bind the task queues to their exchanges before any process sends or consumes.

    The folder broker keeps each exchange's bindings in one JSON file, which kombu rewrites in
    place without truncating, and creates by truncating outside its lock: processes binding
    their first queues at the same moment (`thaw serve` starts the API and its workers
    together) have left it holding one table followed by the rest of another, after which
    every send failed (`broker_unavailable`). Bound here, one process at a time, each file is
    complete before any other process reads it, and later bindings find theirs and write
    nothing."""
    import fcntl

    with (folder / "control" / "bindings.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with app.connection_for_write() as connection:
            channel = connection.default_channel
            for queue in app.amqp.queues.values():
                queue.bind(channel).declare()


class ConsumerRegistry(ABC):
    """Which worker consumes which queue, as the workers last announced it: the live-queue
    registry. In Redis on a fleet, in a folder under the data directory on the embedded
    default (its workers share the API's machine)."""

    @abstractmethod
    def announce(self, *, queues: list[str], worker: str) -> None:
        """Say that `worker` consumes `queues`, for the next `CONSUMER_TTL_SECONDS`."""

    @abstractmethod
    def forget(self, worker: str) -> None:
        """Drop `worker`'s announcements at once: its supervisor saw it die."""

    @abstractmethod
    def live(self) -> set[str]:
        """The queues some worker announced within `CONSUMER_TTL_SECONDS`."""


class RedisConsumers(ConsumerRegistry):
    """A key per queue and worker, expiring after `CONSUMER_TTL_SECONDS`."""

    def __init__(self, url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)

    def announce(self, *, queues: list[str], worker: str) -> None:
        with self.client.pipeline() as pipe:
            for queue in queues:
                pipe.set(f"{_CONSUMERS}{queue}:{worker}", "1", ex=int(CONSUMER_TTL_SECONDS))
            pipe.execute()

    def forget(self, worker: str) -> None:
        keys = [
            key
            for key in self.client.scan_iter(match=f"{_CONSUMERS}*", count=500)
            if key.decode().rsplit(":", 1)[1] == worker
        ]
        if keys:
            self.client.delete(*keys)

    def live(self) -> set[str]:
        return {
            key.decode().removeprefix(_CONSUMERS).rsplit(":", 1)[0]
            for key in self.client.scan_iter(match=f"{_CONSUMERS}*", count=500)
        }


class FolderConsumers(ConsumerRegistry):
    """A file per queue and worker (`<queue>+<worker>`), live while its modification time is
    within `CONSUMER_TTL_SECONDS`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def announce(self, *, queues: list[str], worker: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for queue in queues:
            (self.folder / f"{queue}+{worker}").touch()

    def forget(self, worker: str) -> None:
        for entry in self._entries():
            if entry.name.split("+", 1)[1] == worker:
                entry.unlink(missing_ok=True)

    def live(self) -> set[str]:
        fresh_after = time.time() - CONSUMER_TTL_SECONDS
        live: set[str] = set()
        for entry in self._entries():
            try:
                if entry.stat().st_mtime >= fresh_after:
                    live.add(entry.name.split("+", 1)[0])
            except FileNotFoundError:
                continue  # forgotten meanwhile
        return live

    def _entries(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return [entry for entry in self.folder.iterdir() if "+" in entry.name]


def consumer_registry(settings: Settings) -> ConsumerRegistry:
    url = settings.shared_redis_url
    if url is not None:
        return RedisConsumers(url)
    return FolderConsumers(settings.data_dir.resolve() / "consumers")


def start_consumer_heartbeat(
    settings: Settings, *, queues: list[str], worker: str, stop: threading.Event
) -> threading.Thread:
    """Announce this worker's queues every heartbeat until `stop`."""
    registry = consumer_registry(settings)

    def beat() -> None:
        while True:
            try:
                registry.announce(queues=queues, worker=worker)
            except Exception as exc:
                logger.warning("could not announce the queues this worker consumes: %s", exc)
            if stop.wait(CONSUMER_HEARTBEAT_SECONDS):
                return

    thread = threading.Thread(target=beat, name="thaw-queue-heartbeat", daemon=True)
    thread.start()
    return thread


@cache
def this_host_has_cuda() -> bool:
    import torch  # loaded only when a CUDA job meets the embedded default

    return bool(torch.cuda.is_available())


def refuse_unservable(settings: Settings, *, queue: str) -> None:
    """422 for a job the embedded default could never run: its workers are on this machine
    (the folder broker reaches no other), so a GPU job needs a GPU here."""
    if queue == GPU_QUEUE and settings.broker_url is None and not this_host_has_cuda():
        raise ApiError(
            422,
            "no_gpu_worker",
            "`device: cuda` needs a GPU worker, and this thaw runs embedded (no "
            "THAW_BROKER_URL: its workers run on this machine) on a machine without a CUDA "
            "GPU. Use `device: cpu`, or run thaw as a fleet with a GPU worker host (README, "
            '"Fleet").',
            param="device",
        )
