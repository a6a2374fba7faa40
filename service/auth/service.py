"""API keys: random secrets shown once, stored as SHA-256 hashes, resolved to one tenant."""

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db import utcnow
from service.tables import ApiKey, Tenant

KEY_PREFIX = "thaw_"


def hash_key(key: str) -> str:
    # Keys carry 256 random bits, so a fast hash is enough: there is nothing to brute-force.
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, *, tenant_name: str) -> tuple[ApiKey, str]:
    """Create the tenant if new and a key for it; returns the row and the plaintext key."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(name=tenant_name)
        session.add(tenant)
        session.flush()
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    api_key = ApiKey(tenant_id=tenant.id, key_hash=hash_key(plaintext), prefix=plaintext[:12])
    session.add(api_key)
    session.commit()
    return api_key, plaintext


def authenticate(session: Session, *, key: str) -> Tenant | None:
    api_key = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    if api_key is None or api_key.revoked_at is not None:
        return None
    if api_key.expires_at is not None and api_key.expires_at <= utcnow():
        return None
    return api_key.tenant
