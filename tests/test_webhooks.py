"""Webhooks against a real HTTP receiver in this process: a tenant's events arrive signed with
the secret it was shown once, a failing receiver is retried with backoff and given up after the
bound, a slow one never slows a request or the change that emitted the event, and the outbox
outlives its sender (a restart)."""

import hashlib
import hmac
import itertools
import json
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.auth.service import authenticate
from service.context import AppContext
from service.jobs import transitions
from service.main import create_app
from service.tables import Dataset, Job, Tenant, WebhookDelivery
from service.webhooks.delivery import WebhookSender
from service.webhooks.outbox import JOB_SUCCEEDED, emit
from tests.conftest import make_settings, new_key, run_cli
from tests.test_api import assert_error

MAX_ATTEMPTS = 3
WAIT = 10.0
"""Seconds a test waits for a delivery it expects (they take well under one)."""


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    """`time.monotonic()` on arrival."""


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 recording every POST. `answers[path]` lists the statuses
    it gives in turn (then 200); a path under `/slow` waits for `release` first."""

    url: str = ""
    received: list[Received] = field(default_factory=list)
    answers: dict[str, list[int]] = field(default_factory=dict)
    release: threading.Event = field(default_factory=threading.Event)
    arrived: threading.Condition = field(default_factory=threading.Condition)

    def at(self, path: str) -> list[Received]:
        with self.arrived:
            return [request for request in self.received if request.path == path]

    def wait_for(self, path: str, count: int) -> list[Received]:
        return self.wait_until(path, lambda received: len(received) >= count)

    def wait_until(self, path: str, done: Callable[[list[Received]], bool]) -> list[Received]:
        with self.arrived:
            assert self.arrived.wait_for(lambda: done(self.at(path)), timeout=WAIT), (
                path,
                self.received,
            )
        return self.at(path)


@contextmanager
def receiving() -> Iterator[Receiver]:
    """A `Receiver` serving on a free port of 127.0.0.1 until the block ends."""
    made = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path.startswith("/slow"):
                made.release.wait(WAIT)
            with made.arrived:
                made.received.append(
                    Received(self.path, dict(self.headers), body, time.monotonic())
                )
                statuses = made.answers.get(self.path) or [200]
                status = statuses.pop(0) if len(statuses) > 1 else statuses[0]
                made.arrived.notify_all()
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    made.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield made
    finally:
        made.release.set()
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with receiving() as made:
        yield made


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, migrated_sqlite: Path) -> Iterator[TestClient]:
    data_dir = tmp_path_factory.mktemp("webhooks") / "data"
    shutil.copytree(migrated_sqlite, data_dir)
    # The receiver is on 127.0.0.1: loopback allowed, as an operator allows a private network.
    settings = make_settings(
        data_dir,
        webhook_backoff_seconds=0.05,
        webhook_max_attempts=MAX_ATTEMPTS,
        webhook_allow_private=True,
    )
    with TestClient(create_app(settings)) as client:
        yield client


def context_of(client: TestClient) -> AppContext:
    context: AppContext = client.app.state.context  # type: ignore[attr-defined]
    return context


def hook(client: TestClient, tenant: str, url: str) -> tuple[dict[str, str], str]:
    """A key of `tenant` whose webhook is `url`, and the secret it was shown."""
    auth = new_key(context_of(client), tenant)
    response = client.put("/v1/webhook", headers=auth, json={"url": url})
    assert response.status_code == 200, response.text
    secret: str = response.json()["secret"]
    return auth, secret


def failed_job(context: AppContext, *, tenant: str) -> str:
    """A job of `tenant` that ran and failed, through the job transitions."""
    with context.db.session() as session:
        tenant_id = session.scalars(select(Tenant.id).where(Tenant.name == tenant)).one()
        dataset = Dataset(tenant_id=tenant_id, name="d", status="ready")
        session.add(dataset)
        session.flush()
        job = Job(
            tenant_id=tenant_id,
            dataset_id=dataset.id,
            model_name="digits",
            base_model="resnet18",
            strategy="fine_tune",
            spec={},
            plan={},
            queue="cpu",
            max_runtime_seconds=60,
        )
        transitions.create(session, job=job)
        claimed = transitions.claim(session, job_id=job.id, owner="w", lease=timedelta(seconds=60))
        transitions.fail(
            session, job_id=job.id, attempt=claimed.attempt, code="boom", message="it broke"
        )
        session.commit()
        return job.id


def verify(secret: str, request: Received) -> dict[str, Any]:
    """What a receiver does: check the signature over `<t>.` + body, then read the body."""
    parts = dict(part.split("=", 1) for part in request.headers["Thaw-Signature"].split(","))
    expected = hmac.new(
        secret.encode(), f"{parts['t']}.".encode() + request.body, hashlib.sha256
    ).hexdigest()
    assert hmac.compare_digest(parts["v1"], expected)
    event: dict[str, Any] = json.loads(request.body)
    return event


def deliveries(context: AppContext, tenant_auth: dict[str, str]) -> list[WebhookDelivery]:
    key = tenant_auth["Authorization"].removeprefix("Bearer ")
    with context.db.session() as session:
        api_key = authenticate(session, key=key)
        assert api_key is not None
        return list(
            session.scalars(
                select(WebhookDelivery).where(WebhookDelivery.tenant_id == api_key.tenant_id)
            )
        )


def eventually(check: Callable[[], bool]) -> None:
    """A state the sender writes just after the receiver answered."""
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_a_failed_job_reaches_the_tenants_receiver_signed_with_the_secret_shown_once(
    server: TestClient, receiver: Receiver
) -> None:
    context = context_of(server)
    auth, secret = hook(server, "team-a", f"{receiver.url}/a")
    assert secret.startswith("whsec_")
    shown = server.get("/v1/webhook", headers=auth).json()
    assert shown["url"] == f"{receiver.url}/a"
    assert "secret" not in shown
    assert set(shown["events"]) == {
        "version.shifted",
        "job.succeeded",
        "job.failed",
        "update.ready",
    }
    other = new_key(context, "team-z")
    assert_error(server.get("/v1/webhook", headers=other), 404, "webhook_not_found")
    refused = server.put("/v1/webhook", headers=other, json={"url": "ftp://example.com/x"})
    assert refused.status_code == 422
    assert server.put("/v1/webhook", headers=other, json={"url": 7}).status_code == 422

    job_id = failed_job(context, tenant="team-a")
    (request,) = receiver.wait_for("/a", 1)
    event = verify(secret, request)
    assert request.headers["Thaw-Event"] == "job.failed"
    assert request.headers["Thaw-Delivery"] == event["id"]
    assert event["event"] == "job.failed"
    assert event["data"] == {
        "job_id": job_id,
        "model": "digits",
        "status": "failed",
        "code": "boom",
    }
    with pytest.raises(AssertionError):
        verify("whsec_not-the-secret", request)
    eventually(lambda: server.get("/v1/webhook", headers=auth).json()["deliveries"]["delivered"])
    # A tenant without a webhook queues nothing.
    failed_job(context, tenant="team-z")
    assert deliveries(context, other) == []


def delivery_outcomes(client: TestClient) -> dict[str, float]:
    """`thaw_webhook_deliveries_total` per outcome, as /metrics shows it."""
    scrape = client.get("/metrics").text
    found = re.findall(r'^thaw_webhook_deliveries_total\{outcome="(\w+)"\} (\S+)$', scrape, re.M)
    return {outcome: float(count) for outcome, count in found}


def test_a_failing_receiver_is_retried_with_backoff_then_given_up_after_the_bound(
    server: TestClient, receiver: Receiver
) -> None:
    context = context_of(server)
    before = delivery_outcomes(server)
    receiver.answers["/flaky"] = [500, 200]
    receiver.answers["/down"] = [500]
    flaky, _ = hook(server, "team-b", f"{receiver.url}/flaky")
    down, _ = hook(server, "team-c", f"{receiver.url}/down")
    with context.db.session() as session:
        for tenant in ("team-b", "team-c"):
            tenant_id = session.scalars(select(Tenant.id).where(Tenant.name == tenant)).one()
            emit(session, tenant_id=tenant_id, event=JOB_SUCCEEDED, data={"job_id": tenant})
        session.commit()

    first, second = receiver.wait_for("/flaky", 2)
    assert first.body == second.body  # the same event, sent again
    eventually(lambda: deliveries(context, flaky)[0].status == "delivered")
    assert deliveries(context, flaky)[0].attempts == 2

    sent = receiver.wait_for("/down", MAX_ATTEMPTS)
    eventually(lambda: deliveries(context, down)[0].status == "failed")
    (given_up,) = deliveries(context, down)
    assert (given_up.attempts, given_up.last_error) == (MAX_ATTEMPTS, "HTTP 500")
    assert len(receiver.at("/down")) == MAX_ATTEMPTS
    # Attempt n+1 waits at least backoff * 2^(n-1): 0.05 s, then 0.1 s.
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(sent)]
    assert gaps[0] >= 0.05, gaps
    assert gaps[1] >= 0.1, gaps
    summary = server.get("/v1/webhook", headers=down).json()["deliveries"]
    assert summary == {"pending": 0, "delivered": 0, "failed": 1, "last_error": "HTTP 500"}
    # Counted: /flaky retried once then delivered, /down retried twice then failed.
    after = delivery_outcomes(server)
    counted = {
        outcome: after.get(outcome, 0) - before.get(outcome, 0)
        for outcome in ("delivered", "retried", "failed")
    }
    assert counted == {"delivered": 1, "retried": 3, "failed": 1}


def test_a_slow_receiver_never_slows_a_request_or_the_change_that_emitted_the_event(
    server: TestClient, receiver: Receiver
) -> None:
    context = context_of(server)
    auth, _ = hook(server, "team-d", f"{receiver.url}/slow")
    receiver.release.clear()
    try:
        failed_job(context, tenant="team-d")
        # The sender is now waiting on the receiver (up to its 10 s timeout)...
        eventually(lambda: deliveries(context, auth)[0].attempts == 1)
        started = time.perf_counter()
        failed_job(context, tenant="team-d")  # ...while another event is queued
        assert server.get("/v1/me", headers=auth).status_code == 200
        assert server.get("/v1/webhook", headers=auth).json()["deliveries"]["pending"] == 2
        assert time.perf_counter() - started < 1.0
    finally:
        receiver.release.set()
    receiver.wait_for("/slow", 2)


REFUSED = [
    "http://127.0.0.1:9/hook",
    "http://localhost/hook",
    "http://10.1.2.3/hook",
    "http://192.168.0.1/hook",
    "http://169.254.169.254/latest/meta-data",  # the cloud metadata service
    "http://[::1]/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "http://0.0.0.0/hook",
    "http://100.64.0.1/hook",
]


def test_a_private_or_loopback_url_is_refused_unless_the_operator_allows_it(
    server: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    context = context_of(server)
    monkeypatch.setattr(context.settings, "webhook_allow_private", False)
    auth = new_key(context, "team-f")
    for url in REFUSED:
        refused = server.put("/v1/webhook", headers=auth, json={"url": url})
        error = assert_error(refused, 422, "webhook_url_refused", "url")
        assert "not a public address" in error["message"], (url, error)
    assert_error(server.get("/v1/webhook", headers=auth), 404, "webhook_not_found")
    public = server.put("/v1/webhook", headers=auth, json={"url": "https://93.184.215.14/hook"})
    assert public.status_code == 200, public.text
    server.delete("/v1/webhook", headers=auth)


def test_an_address_no_longer_public_at_send_time_fails_the_delivery_unsent(
    server: TestClient, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Set while allowed (as a name could resolve publicly when set, privately later): the
    sender checks again and sends nothing."""
    context = context_of(server)
    auth, _ = hook(server, "team-g", f"{receiver.url}/rebound")
    before = delivery_outcomes(server)
    monkeypatch.setattr(context.settings, "webhook_allow_private", False)
    failed_job(context, tenant="team-g")
    eventually(lambda: [row.status for row in deliveries(context, auth)] == ["failed"])
    (delivery,) = deliveries(context, auth)
    assert delivery.attempts == 1
    assert (delivery.last_error or "").startswith("refused: its host '127.0.0.1' resolves to")
    assert receiver.at("/rebound") == []
    assert delivery_outcomes(server).get("failed", 0) == before.get("failed", 0) + 1


def test_thaw_webhook_sets_shows_and_deletes_the_tenants_webhook(
    server: TestClient, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    context = context_of(server)
    auth = new_key(context, "team-h")
    missing = run_cli(server, auth, ["webhook", "show"], exit_code=1)
    assert "404 webhook_not_found" in missing
    with monkeypatch.context() as private_refused:
        private_refused.setattr(context.settings, "webhook_allow_private", False)
        refused = run_cli(server, auth, ["webhook", "set", "http://127.0.0.1:9/x"], exit_code=1)
    assert "422 webhook_url_refused (url)" in refused
    assert "Traceback" not in refused

    target = f"{receiver.url}/cli"
    made = json.loads(run_cli(server, auth, ["webhook", "set", target, "--json"]))
    assert made["url"] == target
    secret = made["secret"]
    assert secret.startswith("whsec_")
    failed_job(context, tenant="team-h")
    (request,) = receiver.wait_for("/cli", 1)
    assert verify(secret, request)["event"] == "job.failed"
    eventually(lambda: server.get("/v1/webhook", headers=auth).json()["deliveries"]["delivered"])

    shown = run_cli(server, auth, ["webhook", "show"])
    assert target in shown
    assert "delivered" in shown
    assert secret not in shown
    assert json.loads(run_cli(server, auth, ["webhook", "show", "--json"]))["deliveries"] == {
        "pending": 0,
        "delivered": 1,
        "failed": 0,
        "last_error": None,
    }
    again = run_cli(server, auth, ["webhook", "set", target])
    assert "secret (shown once)" in again
    assert secret not in again  # setting it again makes a new secret

    assert "webhook deleted" in run_cli(server, auth, ["webhook", "delete"])
    assert_error(server.get("/v1/webhook", headers=auth), 404, "webhook_not_found")
    assert "404 webhook_not_found" in run_cli(server, auth, ["webhook", "delete"], exit_code=1)


def test_pending_events_outlive_their_sender(server: TestClient, receiver: Receiver) -> None:
    """The outbox is a table: events queued while no sender runs are sent by the next one
    (a restarted API process)."""
    context = context_of(server)
    sender: WebhookSender = server.app.state.webhooks  # type: ignore[attr-defined]
    sender.close()
    auth, secret = hook(server, "team-e", f"{receiver.url}/later")
    job_id = failed_job(context, tenant="team-e")
    assert [row.status for row in deliveries(context, auth)] == ["pending"]
    restarted = WebhookSender(context, server.app.state.inference_metrics)  # type: ignore[attr-defined]
    try:
        (request,) = receiver.wait_for("/later", 1)
        assert verify(secret, request)["data"]["job_id"] == job_id
    finally:
        restarted.close()
