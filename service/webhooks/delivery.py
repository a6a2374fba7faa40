"""Sending the outbox: one sender thread per API process, never on a request's path.

Each pass takes the due deliveries, claims each by a conditional UPDATE (its attempt count read,
so with several API processes each delivery is sent by one of them) that also pushes its due
time past the request timeout: should the process die mid-send, another sends it once that
claim runs out. A 2xx answer delivers it; anything else (an error status, a refused or timed out
connection, a redirect) schedules attempt n+1 after `THAW_WEBHOOK_BACKOFF_SECONDS` * 2^(n-1),
and after `THAW_WEBHOOK_MAX_ATTEMPTS` the delivery is `failed`. The URL's host is resolved
again before each send (DNS may have changed since `PUT /v1/webhook`): one that is no longer
public fails the delivery at once. Each outcome is counted (`thaw_webhook_deliveries_total`).
The outbox is a table, so a restart loses nothing pending. Delivery is at least once:
receivers dedupe on the `Thaw-Delivery` id.
"""

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

import httpx
from sqlalchemy import delete, func, select, update

from service.context import AppContext
from service.db import utcnow
from service.inference.metrics import InferenceMetrics
from service.tables import Webhook, WebhookDelivery
from service.webhooks.outbox import SIGNATURE_HEADER, sign
from service.webhooks.service import DELIVERED, FAILED, PENDING, refused_address

logger = logging.getLogger(__name__)

POLL_SECONDS = 1.0
"""How often a sender looks for events other processes queued."""
REQUEST_TIMEOUT_SECONDS = 10.0
CLAIM = timedelta(seconds=3 * REQUEST_TIMEOUT_SECONDS)
BATCH = 50
CONCURRENT_SENDS = 8
"""Deliveries a sender has in flight at once, so one slow receiver does not hold up the rest."""
RETRIED = "retried"
"""The outcome of a failed attempt that another will follow (a metric label, not a status)."""
KEEP_ENDED = timedelta(days=7)
"""Delivered and failed events are kept this long (the webhook's counts), then deleted."""


class WebhookSender:
    def __init__(self, context: AppContext, metrics: InferenceMetrics) -> None:
        self.context = context
        self.metrics = metrics
        self.max_attempts = context.settings.webhook_max_attempts
        self.backoff = context.settings.webhook_backoff_seconds
        self._client = httpx.Client(
            timeout=REQUEST_TIMEOUT_SECONDS,
            follow_redirects=False,
            limits=httpx.Limits(max_connections=CONCURRENT_SENDS),
        )
        self._pool = ThreadPoolExecutor(CONCURRENT_SENDS, thread_name_prefix="webhook-send")
        self._pruned = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=REQUEST_TIMEOUT_SECONDS + 1)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    def _run(self) -> None:
        pause = POLL_SECONDS
        while not self._stop.wait(pause):
            try:
                self.deliver_due()
                pause = self._until_next_due()
                if time.monotonic() - self._pruned > KEEP_ENDED.total_seconds() / 100:
                    self._prune()
            except Exception:
                logger.exception("webhook sender pass failed; will retry")
                pause = POLL_SECONDS

    def deliver_due(self) -> int:
        """Send every delivery due now that this sender could claim; returns how many."""
        now = utcnow()
        with self.context.db.session() as session:
            due = session.execute(
                select(WebhookDelivery.id, WebhookDelivery.attempts)
                .where(WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at <= now)
                .order_by(WebhookDelivery.next_attempt_at)
                .limit(BATCH)
            ).all()
        claimed = [
            (delivery_id, attempts + 1)
            for delivery_id, attempts in due
            if self._claim(delivery_id, attempts=attempts, now=now)
        ]
        sends = [self._pool.submit(self._send, *delivery) for delivery in claimed]
        for send in sends:
            send.result()
        return len(sends)

    def _claim(self, delivery_id: str, *, attempts: int, now: datetime) -> bool:
        with self.context.db.session() as session:
            claimed = session.execute(
                update(WebhookDelivery)
                .where(
                    WebhookDelivery.id == delivery_id,
                    WebhookDelivery.status == PENDING,
                    WebhookDelivery.attempts == attempts,
                    WebhookDelivery.next_attempt_at <= now,
                )
                .values(attempts=attempts + 1, next_attempt_at=now + CLAIM)
            )
            session.commit()
            return bool(claimed.rowcount)  # type: ignore[attr-defined]

    def _send(self, delivery_id: str, attempt: int) -> None:
        with self.context.db.session() as session:
            delivery = session.get_one(WebhookDelivery, delivery_id)
            webhook = session.get(Webhook, delivery.tenant_id)
            body = json.dumps(
                {
                    "id": delivery.id,
                    "event": delivery.event,
                    "created_at": delivery.created_at.isoformat().replace("+00:00", "Z"),
                    "data": delivery.data,
                },
                separators=(",", ":"),
            ).encode()
            event = delivery.event
            url, secret = (webhook.url, webhook.secret) if webhook else (None, None)
        error = None
        refused = None
        if url is not None and not self.context.settings.webhook_allow_private:
            refused = refused_address(url)
        if url is None or secret is None:
            error = "the webhook was removed"
        elif refused is not None:
            error = f"refused: {refused}"
        else:
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "thaw-webhooks",
                "Thaw-Event": event,
                "Thaw-Delivery": delivery_id,
                SIGNATURE_HEADER: sign(secret, timestamp=int(time.time()), body=body),
            }
            try:
                response = self._client.post(url, content=body, headers=headers)
                if not 200 <= response.status_code < 300:
                    error = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"[:500]
        self._record(
            delivery_id, attempt=attempt, error=error, final=url is None or refused is not None
        )

    def _record(self, delivery_id: str, *, attempt: int, error: str | None, final: bool) -> None:
        """The attempt's outcome, unless another sender took the delivery over since (its
        claim ran out): fenced by the attempt count."""
        now = utcnow()
        values: dict[str, object]
        if error is None:
            outcome = DELIVERED
            values = {"status": DELIVERED, "delivered_at": now, "last_error": None}
        elif final or attempt >= self.max_attempts:
            outcome = FAILED
            values = {"status": FAILED, "last_error": error}
            logger.warning("webhook delivery %s failed for good: %s", delivery_id, error)
        else:
            outcome = RETRIED
            delay = timedelta(seconds=self.backoff * 2 ** (attempt - 1))
            values = {"next_attempt_at": now + delay, "last_error": error}
        with self.context.db.session() as session:
            recorded = session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == delivery_id, WebhookDelivery.attempts == attempt)
                .values(**values)
            )
            session.commit()
        if recorded.rowcount:  # type: ignore[attr-defined]
            self.metrics.webhook_deliveries.labels(outcome).inc()

    def _until_next_due(self) -> float:
        """Seconds to the next pending delivery's due time, at most `POLL_SECONDS`."""
        with self.context.db.session() as session:
            earliest = session.scalar(
                select(func.min(WebhookDelivery.next_attempt_at)).where(
                    WebhookDelivery.status == PENDING
                )
            )
        if earliest is None:
            return POLL_SECONDS
        return min(POLL_SECONDS, max(0.0, (earliest - utcnow()).total_seconds()))

    def _prune(self) -> None:
        with self.context.db.session() as session:
            session.execute(
                delete(WebhookDelivery).where(
                    WebhookDelivery.status.in_([DELIVERED, FAILED]),
                    WebhookDelivery.created_at < utcnow() - KEEP_ENDED,
                )
            )
            session.commit()
        self._pruned = time.monotonic()
