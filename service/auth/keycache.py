"""Authenticated API keys kept for a short while, so a call costs no database read for its key.

Only keys that authenticated are kept (unknown tokens are not, so nobody can fill the memory by
guessing). An entry ends at the earliest of its lifetime (`THAW_API_KEY_CACHE_SECONDS`) and the
key's own expiry; a revoke committed by any process clears the whole cache of every API process
before its next request (`service/replicas.py`, topic `api_keys`).
"""

import threading
import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import make_transient_to_detached

from service.db import utcnow
from service.tables import ApiKey, Tenant


@dataclass(frozen=True)
class CachedKey:
    key_id: str
    expires_at: datetime | None
    tenant: Tenant
    """Detached: `session.merge(tenant, load=False)` gives a request its own copy, no query."""
    until: float


class ApiKeyCache:
    def __init__(self, *, ttl_seconds: float) -> None:
        self.ttl = ttl_seconds
        self._entries: dict[str, CachedKey] = {}
        self._lock = threading.Lock()
        self._generation = 0

    def generation(self) -> int:
        return self._generation

    def get(self, key_hash: str) -> CachedKey | None:
        entry = self._entries.get(key_hash)
        if entry is None or entry.until < time.monotonic():
            return None
        if entry.expires_at is not None and entry.expires_at <= utcnow():
            return None
        return entry

    def put(self, key_hash: str, api_key: ApiKey, *, generation: int) -> None:
        """Keep a key read at `generation`; dropped if a clear happened since (what was read
        may predate a revoke)."""
        if self.ttl <= 0:
            return
        tenant = Tenant(
            id=api_key.tenant.id, name=api_key.tenant.name, created_at=api_key.tenant.created_at
        )
        make_transient_to_detached(tenant)
        entry = CachedKey(
            key_id=api_key.id,
            expires_at=api_key.expires_at,
            tenant=tenant,
            until=time.monotonic() + self.ttl,
        )
        with self._lock:
            if generation == self._generation:
                self._entries[key_hash] = entry

    def clear(self) -> None:
        with self._lock:
            self._generation += 1
            self._entries.clear()
