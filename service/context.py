"""What both processes share at run time: settings, database, artifacts, Celery client."""

from dataclasses import dataclass
from functools import cached_property

from celery import Celery

from service.db import Database
from service.queues import create_celery
from service.replicas import ChangeFeed, open_generations
from service.settings import Settings
from service.storage import ArtifactStore, open_store


@dataclass
class AppContext:
    settings: Settings

    @cached_property
    def db(self) -> Database:
        database = Database(self.settings.resolved_database_url)
        # Every process that commits announces changes other processes cache (replicas.py).
        self.changes.watch(database.sessionmaker)
        return database

    @cached_property
    def changes(self) -> ChangeFeed:
        return ChangeFeed(open_generations(self.settings))

    @cached_property
    def store(self) -> ArtifactStore:
        return open_store(self.settings)

    @cached_property
    def celery(self) -> Celery:
        # Built when first used: the API only needs the client, and only when it enqueues.
        return create_celery(self.settings)

    @property
    def scratch_dir(self) -> str:
        """Temporary work folder on the same file system as the store, so moves are renames."""
        path = self.settings.data_dir.resolve() / "tmp"
        path.mkdir(parents=True, exist_ok=True)
        return str(path)
