"""The shared state's failure modes, in-process against real Redis: a limiter whose Redis is
gone limits in its own process; generations that cannot be read clear every cache."""

import logging
import uuid
from pathlib import Path

import pytest

from service.auth.ratelimit import RedisRateLimiter
from service.replicas import API_KEYS, MODELS, ChangeFeed, FileGenerations, RedisGenerations


def test_two_limiters_on_one_redis_share_one_bucket(redis_url: str) -> None:
    first = RedisRateLimiter(per_minute=4, url=redis_url)
    second = RedisRateLimiter(per_minute=4, url=redis_url)
    answers = [(first, second)[call % 2].retry_after("key_shared") for call in range(8)]
    assert answers[:4] == [None] * 4
    assert all(wait is not None and wait >= 1 for wait in answers[4:])


def test_a_limiter_whose_redis_is_gone_limits_in_its_process() -> None:
    limiter = RedisRateLimiter(per_minute=3, url="redis://127.0.0.1:9/0")
    answers = [limiter.retry_after("key_alone") for _ in range(5)]
    assert answers[:3] == [None] * 3
    assert answers[3] is not None


def test_a_bump_clears_only_its_topic_and_unreadable_generations_clear_all(
    tmp_path: Path, redis_url: str
) -> None:
    cleared: list[str] = []
    for generations in (FileGenerations(tmp_path), RedisGenerations(redis_url)):
        feed = ChangeFeed(generations)
        feed.on_change(API_KEYS, lambda: cleared.append(API_KEYS))
        feed.on_change(MODELS, lambda: cleared.append(MODELS))
        feed.sync()  # the first sync knows nothing yet: clears all
        cleared.clear()
        feed.sync()
        assert cleared == []
        generations.bump(MODELS)
        feed.sync()
        assert cleared == [MODELS]
        cleared.clear()
        generations.bump(API_KEYS)
        feed.sync()
        assert cleared == [API_KEYS]

    cleared.clear()
    feed = ChangeFeed(RedisGenerations("redis://127.0.0.1:9/0"))
    feed.on_change(MODELS, lambda: cleared.append(MODELS))
    feed.sync()
    feed.sync()
    assert cleared == [MODELS, MODELS]  # every request, until Redis answers


def test_a_limiter_of_zero_is_unlimited_and_one_a_minute_is_one(redis_url: str) -> None:
    key = f"key_{uuid.uuid4().hex}"
    unlimited = RedisRateLimiter(per_minute=0, url=redis_url)
    assert [unlimited.retry_after(key) for _ in range(3)] == [None] * 3
    one = RedisRateLimiter(per_minute=1, url=redis_url)
    assert one.retry_after(key) is None
    assert one.retry_after(key) == 60


def test_the_wait_is_rounded_up_to_whole_seconds(redis_url: str) -> None:
    limiter = RedisRateLimiter(per_minute=120, url=redis_url)  # a token every half second
    key = f"key_{uuid.uuid4().hex}"
    assert all(limiter.retry_after(key) is None for _ in range(120))
    assert limiter.retry_after(key) == 1


def test_a_limiter_whose_redis_is_gone_keeps_a_bucket_per_key_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limiter = RedisRateLimiter(per_minute=1, url="redis://127.0.0.1:9/0")
    with caplog.at_level(logging.WARNING, logger="service.auth.ratelimit"):
        assert limiter.retry_after("key_a") is None
        assert limiter.retry_after("key_b") is None
        assert limiter.retry_after("key_a") is not None
    assert (
        caplog.records[0]
        .getMessage()
        .startswith("shared rate limit unavailable, limiting in this process: Error ")
    )
