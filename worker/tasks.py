"""Celery tasks: thin, they take ids and hand over to the code that does the work."""

from functools import cache

import torch
from celery import Celery
from celery.signals import worker_init, worker_process_init, worker_shutting_down

from service.context import AppContext
from service.datasets.service import process_upload
from service.queues import INGEST_TASK, SCORE_UPDATE_TASK, TRAIN_TASK
from service.settings import get_settings
from service.updates.service import advance_after_ingest
from worker import jobs, updates


@cache
def context() -> AppContext:
    return AppContext(get_settings())


def _configure_torch(**_: object) -> None:
    threads = get_settings().torch_threads
    if threads:
        torch.set_num_threads(threads)


def _hand_back_running_job(**_: object) -> None:
    # Sent from the signal handler of the process running the task (the solo pool): training
    # stops after its current step, checkpoints and re-queues the job, and Celery's warm
    # shutdown, which waits for the task, then completes in seconds instead of hours.
    jobs.shutdown_requested.set()


def train_job(job_id: str) -> None:
    jobs.execute(context(), job_id=job_id)


def ingest_dataset(dataset_id: str) -> None:
    process_upload(context=context(), dataset_id=dataset_id)
    advance_after_ingest(context(), dataset_id=dataset_id)


def score_update(job_id: str) -> None:
    updates.score_after_job(context(), job_id=job_id)


def register_tasks(app: Celery) -> None:
    """Give `app` thaw's tasks, and the worker process the signal handlers it needs."""
    app.task(name=TRAIN_TASK)(train_job)
    app.task(name=INGEST_TASK)(ingest_dataset)
    app.task(name=SCORE_UPDATE_TASK)(score_update)
    worker_init.connect(_configure_torch)
    worker_process_init.connect(_configure_torch)
    worker_shutting_down.connect(_hand_back_running_job)
