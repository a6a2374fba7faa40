"""What API replicas (and the CLI, and workers) share so that they agree at once.

Each process keeps short-lived caches (resolved model versions, authenticated API keys) to save
a database round trip per call. A change that makes one stale (a version deleted or archived,
an alias moved, a key revoked) is committed by some process; every commit touching the tables
of a topic bumps that topic's shared *generation*, and every API process compares the
generations with the ones it last saw at the start of each authenticated request, clearing its
caches of any topic that moved. So no replica answers from a cache older than the last change
committed before the request began.

The generations live in Redis when the deployment has one (`THAW_REDIS_URL`, or a `redis://`
broker), else in small files under `<data_dir>/generations` (the embedded default: one host).
Reading them is one `MGET` or two `stat` calls per request. When Redis cannot be read, caches are
cleared on every request until it can: slower, never stale.
"""

import logging
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import ORMExecuteState, Session, sessionmaker

from service.db import Base
from service.settings import Settings
from service.tables import ApiKey, ModelAlias, ModelVersion, RegisteredModel, Tenant

logger = logging.getLogger(__name__)

API_KEYS = "api_keys"
MODELS = "models"
TOPICS = (API_KEYS, MODELS)

# Which tables' rows each topic's caches are built from.
_TOPIC_OF: dict[type[Base], str] = {
    ApiKey: API_KEYS,
    Tenant: API_KEYS,
    ModelAlias: MODELS,
    ModelVersion: MODELS,
    RegisteredModel: MODELS,
}
_TOPIC_OF_TABLE = {str(entity.__tablename__): topic for entity, topic in _TOPIC_OF.items()}
_PENDING = "thaw_changed_topics"


class Generations(ABC):
    @abstractmethod
    def read(self) -> tuple[Hashable, ...]:
        """One opaque token per topic (in `TOPICS` order) that changes with every bump."""

    @abstractmethod
    def bump(self, topic: str) -> None: ...


class RedisGenerations(Generations):
    def __init__(self, url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self.keys = [f"thaw:generation:{topic}" for topic in TOPICS]

    def read(self) -> tuple[Hashable, ...]:
        return tuple(self.client.mget(self.keys))

    def bump(self, topic: str) -> None:
        self.client.incr(f"thaw:generation:{topic}")


class FileGenerations(Generations):
    """A file per topic, replaced on each bump: a new inode and mtime every time."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def read(self) -> tuple[Hashable, ...]:
        tokens: list[Hashable] = []
        for topic in TOPICS:
            try:
                info = os.stat(self.folder / topic)
                tokens.append((info.st_ino, info.st_mtime_ns))
            except FileNotFoundError:
                tokens.append(None)
        return tuple(tokens)

    def bump(self, topic: str) -> None:
        temp = self.folder / f".{topic}-{os.getpid()}-{threading.get_ident()}"
        temp.write_bytes(os.urandom(8))
        os.replace(temp, self.folder / topic)


def open_generations(settings: Settings) -> Generations:
    url = settings.shared_redis_url
    if url is not None:
        return RedisGenerations(url)
    return FileGenerations(settings.data_dir.resolve() / "generations")


class ChangeFeed:
    """This process's view of the shared generations, and the caches to clear when they move."""

    def __init__(self, generations: Generations) -> None:
        self.generations = generations
        self._seen: tuple[Hashable, ...] | None = None
        self._listeners: dict[str, list[Callable[[], None]]] = {topic: [] for topic in TOPICS}

    def on_change(self, topic: str, clear: Callable[[], None]) -> None:
        self._listeners[topic].append(clear)

    def sync(self) -> None:
        """Clear the caches of every topic changed since the last sync (all of them when the
        generations cannot be read)."""
        try:
            current: tuple[Hashable, ...] | None = self.generations.read()
        except Exception as exc:
            logger.warning("shared generations unreadable, clearing caches: %s", exc)
            current = None
        seen, self._seen = self._seen, current
        for index, topic in enumerate(TOPICS):
            if current is None or seen is None or seen[index] != current[index]:
                for clear in self._listeners[topic]:
                    clear()

    def watch(self, sessions: sessionmaker[Session]) -> None:
        """Bump a topic's generation after every commit (of `sessions`) touching its tables."""

        @event.listens_for(sessions, "before_flush")
        def _flushing(session: Session, *_: Any) -> None:
            for row in (*session.new, *session.dirty, *session.deleted):
                topic = _TOPIC_OF.get(type(row))
                if topic is not None:
                    session.info.setdefault(_PENDING, set()).add(topic)

        @event.listens_for(sessions, "do_orm_execute")
        def _executing(state: ORMExecuteState) -> None:
            # Bulk UPDATE/DELETE statements bypass the flush.
            if state.is_update or state.is_delete:
                table = getattr(getattr(state.statement, "table", None), "name", None)
                topic = _TOPIC_OF_TABLE.get(table) if isinstance(table, str) else None
                if topic is not None:
                    state.session.info.setdefault(_PENDING, set()).add(topic)

        @event.listens_for(sessions, "after_commit")
        def _committed(session: Session) -> None:
            for topic in sorted(session.info.pop(_PENDING, ())):
                try:
                    self.generations.bump(topic)
                except Exception as exc:
                    # The change is committed; other replicas see it when their caches expire.
                    logger.error("could not announce a change of %s: %s", topic, exc)

        @event.listens_for(sessions, "after_rollback")
        def _rolled_back(session: Session) -> None:
            session.info.pop(_PENDING, None)
