"""The worker's Celery app: built on first use, not on import, with thaw's tasks."""

from functools import cache

from celery import Celery

from service.queues import create_celery
from service.settings import get_settings
from worker.tasks import register_tasks


@cache
def worker_app() -> Celery:
    app = create_celery(get_settings())
    register_tasks(app)
    return app
