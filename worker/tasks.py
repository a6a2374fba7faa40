"""Celery tasks: thin, they take ids and hand over to the code that does the work."""

import logging
from functools import cache

import torch
from celery.signals import worker_init, worker_process_init, worker_shutting_down

from service.context import AppContext
from service.datasets.service import process_upload
from service.settings import get_settings
from worker import jobs
from worker.celery_app import INGEST_TASK, TRAIN_TASK, app

logger = logging.getLogger(__name__)


@cache
def context() -> AppContext:
    return AppContext(get_settings())


@worker_init.connect
@worker_process_init.connect
def _configure_torch(**_: object) -> None:
    threads = get_settings().torch_threads
    if threads:
        torch.set_num_threads(threads)


@worker_shutting_down.connect
def _hand_back_running_job(**_: object) -> None:
    # Sent from the signal handler of the process running the task (the solo pool): training
    # stops after its current step, checkpoints and re-queues the job, and Celery's warm
    # shutdown, which waits for the task, then completes in seconds instead of hours.
    jobs.shutdown_requested.set()


@app.task(name=TRAIN_TASK)
def train_job(job_id: str) -> None:
    jobs.execute(context(), job_id=job_id)


@app.task(name=INGEST_TASK)
def ingest_dataset(dataset_id: str) -> None:
    process_upload(context=context(), dataset_id=dataset_id)
