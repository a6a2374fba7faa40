from fastapi import APIRouter, Response

from service.deps import ContextDep, SessionDep, TenantDep
from service.webhooks.schemas import DeliveriesOut, WebhookCreated, WebhookIn, WebhookOut
from service.webhooks.service import (
    check_webhook_url,
    delete_webhook,
    delivery_summary,
    load_webhook,
    set_webhook,
)

router = APIRouter(prefix="/v1/webhook", tags=["webhooks"])

SIGNING = (
    "Each event is a POST of `{id, event, created_at, data}` with the headers `Thaw-Event`, "
    "`Thaw-Delivery` (the event's id: deliveries are at least once) and `Thaw-Signature: "
    "t=<unix seconds>,v1=<hex>`, where hex is HMAC-SHA256 with the secret over `<t>.` followed "
    "by the body. A non-2xx answer is retried with exponential backoff "
    "(`THAW_WEBHOOK_BACKOFF_SECONDS`, `THAW_WEBHOOK_MAX_ATTEMPTS`)."
)


@router.put(
    "",
    summary="Send this tenant's events (version.shifted, job.succeeded, job.failed, "
    "update.ready) to a URL",
    description="Answers the signing secret, once. A URL whose host resolves to a loopback, "
    "private, link-local or other non-public address is a 422 (`webhook_url_refused`) unless "
    "the operator set THAW_WEBHOOK_ALLOW_PRIVATE; it is checked again before each delivery. "
    + SIGNING,
)
def put_webhook(
    body: WebhookIn, tenant: TenantDep, session: SessionDep, context: ContextDep
) -> WebhookCreated:
    url = str(body.url)
    check_webhook_url(url, allow_private=context.settings.webhook_allow_private)
    webhook, secret = set_webhook(session, tenant=tenant, url=url)
    return WebhookCreated(
        url=webhook.url,
        created_at=webhook.created_at,
        deliveries=DeliveriesOut(**delivery_summary(session, tenant_id=tenant.id)),
        secret=secret,
    )


@router.get("", summary="This tenant's webhook and its deliveries (never the secret)")
def get_webhook(tenant: TenantDep, session: SessionDep) -> WebhookOut:
    webhook = load_webhook(session, tenant=tenant)
    return WebhookOut(
        url=webhook.url,
        created_at=webhook.created_at,
        deliveries=DeliveriesOut(**delivery_summary(session, tenant_id=tenant.id)),
    )


@router.delete(
    "",
    status_code=204,
    summary="Stop sending events; those still pending are dropped",
)
def remove_webhook(tenant: TenantDep, session: SessionDep) -> Response:
    delete_webhook(session, tenant=tenant)
    return Response(status_code=204)
