"""API keys: random secrets shown once, stored as SHA-256 hashes, resolved to one tenant."""

import hashlib
import secrets
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.auth.keycache import ApiKeyCache
from service.db import utcnow
from service.tables import ApiKey, Tenant

KEY_PREFIX = "thaw_"


def hash_key(key: str) -> str:
    # Keys carry 256 random bits, so a fast hash is enough: there is nothing to brute-force.
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(
    session: Session, *, tenant_name: str, expires_at: datetime | None = None
) -> tuple[ApiKey, str]:
    """Create the tenant if new and a key for it; returns the row and the plaintext key."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(name=tenant_name)
        session.add(tenant)
        session.flush()
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    api_key = ApiKey(
        tenant_id=tenant.id,
        key_hash=hash_key(plaintext),
        prefix=plaintext[:12],
        expires_at=expires_at,
    )
    session.add(api_key)
    session.commit()
    return api_key, plaintext


def authenticate(session: Session, *, key: str) -> ApiKey | None:
    """The key's row if it is known, not revoked and not expired."""
    api_key = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    if api_key is None or api_key.revoked_at is not None:
        return None
    if api_key.expires_at is not None and api_key.expires_at <= utcnow():
        return None
    return api_key


def authenticate_cached(
    session: Session, *, key: str, cache: ApiKeyCache
) -> tuple[str, Tenant] | None:
    """`authenticate` through the process's key cache: the key's id and its tenant (attached
    to `session`), or None."""
    digest = hash_key(key)
    hit = cache.get(digest)
    if hit is not None:
        return hit.key_id, session.merge(hit.tenant, load=False)
    generation = cache.generation()
    api_key = authenticate(session, key=key)
    if api_key is None:
        return None
    cache.put(digest, api_key, generation=generation)
    return api_key.id, api_key.tenant


def revoke_key(session: Session, *, prefix: str) -> ApiKey | None:
    """Revoke the key whose shown prefix (`thaw_…`, 12 characters) matches; None if unknown."""
    api_key = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    if api_key is not None and api_key.revoked_at is None:
        api_key.revoked_at = utcnow()
        session.commit()
    return api_key


def list_keys(session: Session, *, tenant_name: str | None = None) -> list[tuple[ApiKey, str]]:
    query = select(ApiKey, Tenant.name).join(Tenant).order_by(ApiKey.created_at)
    if tenant_name is not None:
        query = query.where(Tenant.name == tenant_name)
    return [(api_key, name) for api_key, name in session.execute(query)]
