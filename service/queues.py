"""The task queue as the API and the worker both see it: queue and task names, and the one
Celery configuration. Reliability settings live here and nowhere else (DESIGN §5).

Importing this builds nothing: `create_celery` makes an app (and the folder broker's folders)
when a process first needs one.
"""

from celery import Celery
from kombu import Queue

from service.settings import Settings

CPU_QUEUE = "cpu"
GPU_QUEUE = "gpu"
DATASETS_QUEUE = "datasets"

TRAIN_TASK = "thaw.train_job"
INGEST_TASK = "thaw.ingest_dataset"


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
