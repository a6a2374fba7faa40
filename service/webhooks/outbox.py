"""Webhook events, written to the outbox in the transaction of the change they announce.

`emit` adds a row only for a tenant that set a webhook; it never sends anything (the API
processes' senders do, after commit: `delivery.py`), so announcing an event costs a request or a
job one small INSERT and can never wait on the receiver. `sign` is the one home of the
signature a receiver checks.
"""

import hashlib
import hmac
from typing import Any

from sqlalchemy.orm import Session

from service.tables import Webhook, WebhookDelivery

VERSION_SHIFTED = "version.shifted"
JOB_SUCCEEDED = "job.succeeded"
JOB_FAILED = "job.failed"
UPDATE_READY = "update.ready"
EVENTS = (VERSION_SHIFTED, JOB_SUCCEEDED, JOB_FAILED, UPDATE_READY)

SIGNATURE_HEADER = "Thaw-Signature"


def emit(session: Session, *, tenant_id: str, event: str, data: dict[str, Any]) -> None:
    """Queue `event` for the tenant's webhook, if it has one, in the caller's transaction."""
    assert event in EVENTS, event
    if session.get(Webhook, tenant_id) is not None:
        session.add(WebhookDelivery(tenant_id=tenant_id, event=event, data=data))


def sign(secret: str, *, timestamp: int, body: bytes) -> str:
    """The `Thaw-Signature` header: `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>." + body>`.

    The time is signed with the body, so a receiver that refuses old timestamps also refuses
    a recorded delivery sent again."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"
