"""Which model version a predict call names, without a database round trip per call.

`(tenant, model name, version number or alias)` resolves to a `ServedVersion`, a plain snapshot
of the row. Entries live `resolution_cache_seconds` at most; any change this process commits to
a model, a version or an alias clears them all at once (writes are rare, predict calls are not),
so a deleted version, an archived one or a moved alias is never answered from a stale entry
here. Another process's change (the CLI, another API replica) is seen within the entry's
lifetime.
"""

import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import ORMExecuteState, Session, sessionmaker

from service.tables import ModelAlias, ModelVersion, RegisteredModel

# The tables whose rows decide what a (model, version-or-alias) names.
_WATCHED = (ModelAlias, ModelVersion, RegisteredModel)
_WATCHED_TABLES = frozenset(str(entity.__tablename__) for entity in _WATCHED)
_TOUCHED = "thaw_resolution_touched"


@dataclass(frozen=True)
class ServedVersion:
    """What serving a version needs from its row, detached from any session."""

    id: str
    model_name: str
    version: int
    artifact_prefix: str
    exports: dict[str, Any]
    capture: bool = False
    """Whether the model keeps the inputs of its predictions (`service/monitoring/capture.py`)."""

    @classmethod
    def of(cls, row: ModelVersion) -> "ServedVersion":
        return cls(
            id=row.id,
            model_name=row.model.name,
            version=row.version,
            artifact_prefix=row.artifact_prefix,
            exports=dict(row.exports or {}),
            capture=row.model.capture,
        )


Key = tuple[str, str, str]
"""(tenant id, model name, version number or alias as sent)."""


class ResolutionCache:
    def __init__(self, *, ttl_seconds: float) -> None:
        self.ttl = ttl_seconds
        self._entries: dict[Key, tuple[float, ServedVersion]] = {}
        self._lock = threading.Lock()
        self._generation = 0
        """Bumped by every invalidation: a lookup that began before one may not store what it
        read, since it may have read the rows as they were before the change."""

    def generation(self) -> int:
        return self._generation

    def get(self, key: Key) -> ServedVersion | None:
        entry = self._entries.get(key)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, key: Key, version: ServedVersion, *, generation: int) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            if generation == self._generation:
                self._entries[key] = (time.monotonic() + self.ttl, version)

    def invalidate(self) -> None:
        with self._lock:
            self._generation += 1
            self._entries.clear()

    def watch(self, sessions: sessionmaker[Session]) -> None:
        """Invalidate after every commit (of `sessions`) that touched a watched table."""

        @event.listens_for(sessions, "before_flush")
        def _flushing(session: Session, *_: Any) -> None:
            changed = (*session.new, *session.dirty, *session.deleted)
            if any(isinstance(row, _WATCHED) for row in changed):
                self._touched(session)

        @event.listens_for(sessions, "do_orm_execute")
        def _executing(state: ORMExecuteState) -> None:
            # Bulk UPDATE/DELETE statements (e.g. deleting an alias) bypass the flush.
            if (state.is_update or state.is_delete) and _WATCHED_TABLES & _tables(state):
                self._touched(state.session)

        @event.listens_for(sessions, "after_commit")
        def _committed(session: Session) -> None:
            if session.info.pop(_TOUCHED, False):
                self.invalidate()

        @event.listens_for(sessions, "after_rollback")
        def _rolled_back(session: Session) -> None:
            session.info.pop(_TOUCHED, None)

    def _touched(self, session: Session) -> None:
        session.info[_TOUCHED] = True
        # Also now: a lookup racing this commit must not store what it reads meanwhile.
        self.invalidate()


def _tables(state: ORMExecuteState) -> set[str]:
    table = getattr(state.statement, "table", None)
    name = getattr(table, "name", None)
    return {name} if isinstance(name, str) else set()
