"""A tenant's webhook: set (a new signing secret, shown once), read, removed."""

import ipaddress
import secrets
import socket
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from service.db import utcnow
from service.errors import ApiError
from service.tables import Tenant, Webhook, WebhookDelivery

SECRET_PREFIX = "whsec_"
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


def refused_address(url: str) -> str | None:
    """Why a webhook may not be sent to `url`, or None: its host must resolve, and only to
    public addresses. A loopback, private, link-local (the cloud metadata service at
    169.254.169.254), shared, reserved or multicast address would let a tenant make thaw's
    processes call inside its own network (SSRF); `THAW_WEBHOOK_ALLOW_PRIVATE` allows them."""
    split = urlsplit(url)
    host = split.hostname or ""
    try:
        port = split.port or (443 if split.scheme == "https" else 80)
        found = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (OSError, ValueError, UnicodeError) as exc:
        return f"its host {host!r} does not resolve ({type(exc).__name__})"
    for *_, address in found:
        ip = ipaddress.ip_address(str(address[0]).split("%", 1)[0])
        mapped = getattr(ip, "ipv4_mapped", None)
        ip = mapped or ip
        if not ip.is_global or ip.is_multicast:
            return f"its host {host!r} resolves to {ip}, which is not a public address"
    return None


def check_webhook_url(url: str, *, allow_private: bool) -> None:
    """A 422 for a URL whose host is not public, unless private addresses are allowed."""
    if allow_private:
        return
    why = refused_address(url)
    if why is not None:
        raise ApiError(
            422,
            "webhook_url_refused",
            f"url: {why}. Webhooks go to public addresses only (an operator allows others "
            "with THAW_WEBHOOK_ALLOW_PRIVATE).",
            "url",
        )


def set_webhook(session: Session, *, tenant: Tenant, url: str) -> tuple[Webhook, str]:
    """Point the tenant's events at `url` with a new secret; returns the row and the secret.
    Events already queued go to the new address, signed with the new secret. The caller has
    checked the address (`check_webhook_url`)."""
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    webhook = session.get(Webhook, tenant.id)
    if webhook is None:
        webhook = Webhook(tenant_id=tenant.id, url=url, secret=secret)
        session.add(webhook)
    else:
        webhook.url, webhook.secret, webhook.created_at = url, secret, utcnow()
    session.commit()
    return webhook, secret


def load_webhook(session: Session, *, tenant: Tenant) -> Webhook:
    webhook = session.get(Webhook, tenant.id)
    if webhook is None:
        raise ApiError(
            404,
            "webhook_not_found",
            "This tenant has no webhook: set one with PUT /v1/webhook.",
        )
    return webhook


def delete_webhook(session: Session, *, tenant: Tenant) -> None:
    """Remove the webhook and the events still waiting for it."""
    webhook = load_webhook(session, tenant=tenant)
    session.execute(
        delete(WebhookDelivery).where(
            WebhookDelivery.tenant_id == tenant.id, WebhookDelivery.status == PENDING
        )
    )
    session.delete(webhook)
    session.commit()


def delivery_summary(session: Session, *, tenant_id: str) -> dict[str, Any]:
    """How many of the tenant's events are pending, delivered and failed, and the latest
    error a receiver gave."""
    counts = dict(
        session.execute(
            select(WebhookDelivery.status, func.count())
            .where(WebhookDelivery.tenant_id == tenant_id)
            .group_by(WebhookDelivery.status)
        ).all()
    )
    last_error = session.scalar(
        select(WebhookDelivery.last_error)
        .where(WebhookDelivery.tenant_id == tenant_id, WebhookDelivery.last_error.is_not(None))
        .order_by(WebhookDelivery.next_attempt_at.desc())
        .limit(1)
    )
    return {
        "pending": counts.get(PENDING, 0),
        "delivered": counts.get(DELIVERED, 0),
        "failed": counts.get(FAILED, 0),
        "last_error": last_error,
    }
