"""Per-key request rate limit: a token bucket per API key.

With Redis (`Settings.shared_redis_url`) the buckets live there, updated by one atomic script
on Redis's clock, so N API replicas together allow the configured rate, not N times it. Without
one (the embedded default: one API process) they live in this process. Should Redis fail, each
replica falls back to its own buckets until it answers again: a bound of N times the rate for
that while, rather than refusing every call.
"""

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

from service.settings import Settings

logger = logging.getLogger(__name__)


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


# KEYS[1]: the bucket; ARGV: capacity, refill per second. Returns "" when a token was taken,
# else the seconds until one is available (as a string: Redis truncates Lua numbers).
_TAKE_TOKEN = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local tokens = tonumber(state[1]) or capacity
local updated = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - updated) * rate)
local wait = ''
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = tostring((1 - tokens) / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'updated', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(capacity / rate) + 1)
return wait
"""


class RedisRateLimiter(RateLimiter):
    def __init__(self, *, per_minute: int, url: str) -> None:
        super().__init__(per_minute=per_minute)
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._take: Any = self.client.register_script(_TAKE_TOKEN)

    def retry_after(self, key_id: str) -> int | None:
        if self.capacity <= 0:
            return None
        try:
            wait = self._take(
                keys=[f"thaw:ratelimit:{key_id}"], args=[self.capacity, self.refill_per_second]
            )
        except Exception as exc:
            logger.warning("shared rate limit unavailable, limiting in this process: %s", exc)
            return super().retry_after(key_id)
        return None if not wait else max(1, math.ceil(float(wait)))


def make_rate_limiter(settings: Settings) -> RateLimiter:
    url = settings.shared_redis_url
    if url is None:
        return RateLimiter(per_minute=settings.rate_limit_per_minute)
    return RedisRateLimiter(per_minute=settings.rate_limit_per_minute, url=url)
