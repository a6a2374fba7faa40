"""The worker's Celery app: built on first use, not on import, with thaw's tasks."""

import threading
from functools import cache
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from service.queues import create_celery, start_consumer_heartbeat
from service.settings import get_settings
from worker.tasks import register_tasks

_stop_heartbeat = threading.Event()


@cache
def worker_app() -> Celery:
    app = create_celery(get_settings())
    register_tasks(app)
    return app


@worker_ready.connect
def _announce_queues(sender: Any, **_: Any) -> None:
    # So the API's reaper can tell a job whose queue no live worker consumes (queues.py).
    queues = sorted(queue.name for queue in sender.task_consumer.queues)
    start_consumer_heartbeat(
        get_settings(), queues=queues, worker=sender.hostname, stop=_stop_heartbeat
    )


@worker_shutdown.connect
def _stop_announcing(**_: Any) -> None:
    _stop_heartbeat.set()
