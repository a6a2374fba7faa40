"""API keys and limits (issue 5, item 13): stored hashed, revoke and expiry, one 401 for every
kind of bad key, a per-key rate limit and a per-team cap on active jobs."""

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, select

from service.auth.keycache import ApiKeyCache
from service.auth.ratelimit import RateLimiter, RedisRateLimiter, make_rate_limiter
from service.auth.service import (
    authenticate,
    authenticate_cached,
    create_key,
    hash_key,
    list_keys,
    revoke_key,
)
from service.context import AppContext
from service.db import Database, utcnow
from service.settings import Settings
from service.tables import ApiKey
from tests.conftest import make_settings
from tests.test_api import ready_dataset, small_spec


def thaw(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"THAW_DATA_DIR": str(settings.data_dir), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args], env=env, capture_output=True, text=True
    )


def test_keys_are_hashed_and_every_bad_key_gets_the_same_401(
    client: TestClient, context: AppContext, settings: Settings
) -> None:
    created = thaw(settings, "keys", "create", "--tenant", "team-a")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    expiring = thaw(settings, "keys", "create", "--tenant", "team-a", "--expires-days", "1")
    soon = expiring.stdout.strip().splitlines()[-1]
    with context.db.session() as session:
        rows = session.scalars(select(ApiKey)).all()
        stored = {value for row in rows for value in (row.key_hash, row.prefix)}
        assert key not in stored
        assert hash_key(key) in stored
        _, expired = create_key(
            session, tenant_name="team-a", expires_at=utcnow() - timedelta(seconds=1)
        )

    def answer(token: str) -> tuple[int, str]:
        response = client.get("/v1/datasets", headers={"Authorization": f"Bearer {token}"})
        return response.status_code, response.text

    assert answer(key)[0] == 200
    assert answer(soon)[0] == 200
    unknown = answer("thaw_" + "A" * 43)
    assert unknown[0] == 401
    assert answer(expired) == unknown

    listed = thaw(settings, "keys", "list", "--tenant", "team-a").stdout
    assert key[:12] in listed
    assert "expires never" in listed
    revoked = thaw(settings, "keys", "revoke", key[:12])
    assert revoked.returncode == 0, revoked.stderr
    assert answer(key) == unknown
    assert f"{key[:12]}\tteam-a\trevoked" in thaw(settings, "keys", "list").stdout
    assert thaw(settings, "keys", "revoke", "thaw_nothing").returncode == 1


def test_rate_limit_answers_429_with_retry_after(tmp_path: Path) -> None:
    from service.cli import migrate_database
    from service.main import create_app
    from tests.conftest import new_key

    settings = make_settings(tmp_path / "data", rate_limit_per_minute=5)
    migrate_database(settings)
    with TestClient(create_app(settings)) as client:
        context: AppContext = client.app.state.context  # type: ignore[attr-defined]
        first, second = new_key(context, "a"), new_key(context, "b")
        statuses = [client.get("/v1/datasets", headers=first).status_code for _ in range(7)]
        assert statuses == [200] * 5 + [429] * 2
        limited = client.get("/v1/datasets", headers=first)
        assert limited.json()["error"]["code"] == "rate_limited"
        assert int(limited.headers["Retry-After"]) >= 1
        assert client.get("/v1/datasets", headers=second).status_code == 200, "per key"


def test_active_jobs_are_capped_per_team(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    context.settings.max_active_jobs_per_tenant = 2
    dataset_id = ready_dataset(client, context, auth)
    made = [client.post("/v1/jobs", headers=auth, json=small_spec(dataset_id)) for _ in range(3)]
    assert [r.status_code for r in made] == [201, 201, 429]
    assert made[2].json()["error"]["code"] == "too_many_active_jobs"
    assert made[2].headers["Retry-After"]
    client.post(f"/v1/jobs/{made[0].json()['id']}/cancel", headers=auth)
    assert client.post("/v1/jobs", headers=auth, json=small_spec(dataset_id)).status_code == 201


def test_revoking_and_listing_keys_in_process(settings: Settings) -> None:
    database = Database(settings.resolved_database_url)
    with database.session() as session:
        a_row, a_key = create_key(session, tenant_name="team-a")
        b_row, b_key = create_key(session, tenant_name="team-b")
        c_row, _ = create_key(session, tenant_name="team-a")
        assert len(a_key) == len("thaw_") + 43  # 32 random bytes, URL-safe base64
        assert a_row.prefix == a_key[:12]
        assert {(row.id, name) for row, name in list_keys(session, tenant_name="team-a")} == {
            (a_row.id, "team-a"),
            (c_row.id, "team-a"),
        }
        assert len(list_keys(session)) == 3

        revoked = revoke_key(session, prefix=a_key[:12])
        assert revoked is not None
        assert revoked.id == a_row.id
        assert revoked.revoked_at is not None
        first = revoked.revoked_at
        assert revoke_key(session, prefix=a_key[:12]) is revoked
        assert revoked.revoked_at == first  # revoking again changes nothing
        assert revoke_key(session, prefix="thaw_nothing") is None
        assert authenticate(session, key=a_key) is None
        assert authenticate(session, key=b_key) is b_row  # only that key was revoked


def test_a_key_expiring_this_instant_is_refused(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = utcnow()
    with Database(settings.resolved_database_url).session() as session:
        _, key = create_key(session, tenant_name="team-a", expires_at=now)
        monkeypatch.setattr("service.auth.service.utcnow", lambda: now)
        assert authenticate(session, key=key) is None


def test_the_key_cache_answers_without_the_database_until_cleared(settings: Settings) -> None:
    database = Database(settings.resolved_database_url)
    cache = ApiKeyCache(ttl_seconds=60)
    with database.session() as session:
        row, key = create_key(session, tenant_name="team-a")
        assert authenticate_cached(session, key=key, cache=cache) is not None
    statements: list[str] = []
    event.listen(database.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    with database.session() as session:
        cached = authenticate_cached(session, key=key, cache=cache)
        assert cached is not None
        assert (cached[0], cached[1].name) == (row.id, "team-a")
    assert statements == []  # not even the tenant's row
    cache.clear()
    with database.session() as session:
        assert authenticate_cached(session, key=key, cache=cache) is not None
    assert statements != []


class FakeClock:
    """`time.monotonic` under the test's control."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_in_process_limiter_refills_a_bucket_per_key_up_to_its_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock()
    monkeypatch.setattr("service.auth.ratelimit.time.monotonic", clock)
    limiter = RateLimiter(per_minute=2)  # a bucket of 2, a token every 30 s
    assert [limiter.retry_after("key_a") for _ in range(3)] == [None, None, 30]
    assert limiter.retry_after("key_b") is None  # its own bucket
    clock.now += 15  # half a token back: 15 s more to wait
    assert limiter.retry_after("key_a") == 15
    clock.now += 15  # exactly one token
    assert limiter.retry_after("key_a") is None
    assert limiter.retry_after("key_a") == 30
    clock.now += 3600  # a long idle refills only up to the bucket's size
    assert [limiter.retry_after("key_a") for _ in range(3)] == [None, None, 30]
    clock.now += 15.6  # 14.4 s short of a token: the wait is rounded up
    assert limiter.retry_after("key_a") == 15
    unlimited = RateLimiter(per_minute=0)
    assert [unlimited.retry_after("key_a") for _ in range(3)] == [None] * 3
    fast = RateLimiter(per_minute=120)  # a token every half second: wait one whole second
    assert [fast.retry_after("key_a") for _ in range(121)][-2:] == [None, 1]


def test_the_limiter_is_shared_exactly_when_redis_is_configured(tmp_path: Path) -> None:
    alone = make_rate_limiter(make_settings(tmp_path / "a", rate_limit_per_minute=7))
    assert type(alone) is RateLimiter
    assert alone.capacity == 7
    shared = make_rate_limiter(
        make_settings(tmp_path / "b", rate_limit_per_minute=9, redis_url="redis://127.0.0.1:9/0")
    )
    assert isinstance(shared, RedisRateLimiter)
    assert shared.capacity == 9


def cached_key(settings: Settings, **key: object) -> tuple[ApiKey, str]:
    with Database(settings.resolved_database_url).session() as session:
        row, plaintext = create_key(session, tenant_name="team-a", **key)  # type: ignore[arg-type]
        session.refresh(row)
        _ = row.tenant.created_at  # loaded while the session is open
        session.expunge_all()
    return row, plaintext


def test_a_cached_key_ends_with_its_lifetime_or_its_expiry(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    monkeypatch.setattr("service.auth.keycache.time.monotonic", clock)
    now = utcnow()
    monkeypatch.setattr("service.auth.keycache.utcnow", lambda: now)
    cache = ApiKeyCache(ttl_seconds=60)
    row, _ = cached_key(settings)
    cache.put("digest", row, generation=cache.generation())
    entry = cache.get("digest")
    assert entry is not None
    assert (entry.key_id, entry.expires_at) == (row.id, None)
    assert (entry.tenant.id, entry.tenant.name) == (row.tenant.id, "team-a")
    assert entry.tenant.created_at == row.tenant.created_at
    assert cache.get("other") is None
    clock.now += 60  # its last moment
    assert cache.get("digest") is entry
    clock.now += 0.001
    assert cache.get("digest") is None

    expiring, _ = cached_key(settings, expires_at=now + timedelta(seconds=10))
    cache.put("expiring", expiring, generation=cache.generation())
    assert cache.get("expiring") is not None
    now += timedelta(seconds=10)  # the key's own expiry comes first
    assert cache.get("expiring") is None


def test_the_key_cache_keeps_nothing_read_before_a_clear_or_with_no_lifetime(
    settings: Settings,
) -> None:
    row, _ = cached_key(settings)
    cache = ApiKeyCache(ttl_seconds=60)
    read_at = cache.generation()
    cache.clear()  # a revoke committed after the key was read
    assert cache.generation() == read_at + 1
    cache.put("digest", row, generation=read_at)
    assert cache.get("digest") is None
    cache.put("digest", row, generation=cache.generation())
    assert cache.get("digest") is not None
    read_again = cache.generation()
    cache.clear()
    assert cache.get("digest") is None
    cache.put("digest", row, generation=read_again)  # every clear outdates what was read
    assert cache.get("digest") is None
    off = ApiKeyCache(ttl_seconds=0)
    off.put("digest", row, generation=off.generation())
    assert off.get("digest") is None
    short = ApiKeyCache(ttl_seconds=1)  # a lifetime of one second still caches
    short.put("digest", row, generation=short.generation())
    assert short.get("digest") is not None


def test_me_names_the_keys_tenant(client: TestClient, context: AppContext) -> None:
    with context.db.session() as session:
        row, key = create_key(session, tenant_name="team-me")
        tenant_id = row.tenant_id
    response = client.get("/v1/me", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200
    assert response.json() == {"tenant_id": tenant_id, "tenant": "team-me"}
