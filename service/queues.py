"""The task queue as the API and the worker both see it: queue and task names, and the one
Celery configuration. Reliability settings live here and nowhere else (DESIGN §5).

Importing this builds nothing: `create_celery` makes an app (and the folder broker's folders)
when a process first needs one.
"""

import logging
import threading
from functools import cache
from typing import Any

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

CONSUMER_HEARTBEAT_SECONDS = 10.0
CONSUMER_TTL_SECONDS = 3 * CONSUMER_HEARTBEAT_SECONDS
"""A worker re-announces the queues it consumes every heartbeat; an announcement lives three
heartbeats, so a worker that died (or lost Redis) is no longer counted after at most that."""
_CONSUMERS = "thaw:consumers:"


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
    return app


def _redis(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


def announce_consumer(url: str, *, queues: list[str], worker: str) -> None:
    """Say in Redis that `worker` consumes `queues`, for the next `CONSUMER_TTL_SECONDS`."""
    client = _redis(url)
    with client.pipeline() as pipe:
        for queue in queues:
            pipe.set(f"{_CONSUMERS}{queue}:{worker}", "1", ex=int(CONSUMER_TTL_SECONDS))
        pipe.execute()


def start_consumer_heartbeat(
    settings: Settings, *, queues: list[str], worker: str, stop: threading.Event
) -> threading.Thread | None:
    """Announce this worker's queues every heartbeat until `stop` (a fleet only: the embedded
    default's worker runs on the API's machine, which refuses what it cannot serve)."""
    url = settings.shared_redis_url
    if url is None:
        return None

    def beat() -> None:
        while True:
            try:
                announce_consumer(url, queues=queues, worker=worker)
            except Exception as exc:
                logger.warning("could not announce the queues this worker consumes: %s", exc)
            if stop.wait(CONSUMER_HEARTBEAT_SECONDS):
                return

    thread = threading.Thread(target=beat, name="thaw-queue-heartbeat", daemon=True)
    thread.start()
    return thread


def live_queues(url: str) -> set[str]:
    """The queues some worker announced within `CONSUMER_TTL_SECONDS`."""
    client = _redis(url)
    return {
        key.decode().removeprefix(_CONSUMERS).rsplit(":", 1)[0]
        for key in client.scan_iter(match=f"{_CONSUMERS}*", count=500)
    }


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
