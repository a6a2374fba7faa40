"""Per-key request rate limit: a token bucket per API key, held in this process.

Each API replica keeps its own buckets, so a fleet of N replicas behind a balancer allows up to
N times the rate; that bound is enough to stop a runaway client without a shared store.
"""

import math
import threading
import time
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, *, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.refill_per_second = per_minute / 60.0
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def retry_after(self, key_id: str) -> int | None:
        """Take one token for this key: None when allowed, else whole seconds to wait."""
        if self.capacity <= 0:
            return None
        now = time.monotonic()
        with self._lock:
            bucket = self._buckets.setdefault(key_id, _Bucket(self.capacity, now))
            bucket.tokens = min(
                self.capacity, bucket.tokens + (now - bucket.updated) * self.refill_per_second
            )
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return None
            return max(1, math.ceil((1.0 - bucket.tokens) / self.refill_per_second))
