"""A keep-alive connection past `THAW_CONNECTION_MAX_AGE_SECONDS` is closed after its answer,
over a real HTTP server, so the client's next call comes on a new connection."""

import asyncio

import httpx
from starlette.types import Receive, Scope, Send

from service.connection_age import ConnectionAgeMiddleware
from tests.conftest import served_over_http


async def client_port(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers with the port of the connection the call came on."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(scope["client"][1]).encode()})


def test_a_connection_past_its_age_answers_then_closes_and_the_next_call_reconnects() -> None:
    now = [100.0]
    app = ConnectionAgeMiddleware(client_port, max_age_seconds=1.0, clock=lambda: now[0])
    with served_over_http(app) as address, httpx.Client(base_url=f"http://{address}") as client:
        first, second = client.get("/"), client.get("/")
        assert first.text == second.text
        assert "connection" not in first.headers
        assert "connection" not in second.headers

        now[0] += 0.999
        assert client.get("/").text == first.text

        now[0] += 0.001
        closing = client.get("/")
        assert closing.status_code == 200
        assert closing.text == first.text
        assert closing.headers["connection"] == "close"

        reconnected = client.get("/")
        assert reconnected.text != first.text
        assert "connection" not in reconnected.headers


def test_closed_connections_do_not_pile_up() -> None:
    now = [0.0]
    app = ConnectionAgeMiddleware(client_port, max_age_seconds=1.0, clock=lambda: now[0])

    async def call(port: int) -> None:
        async def receive() -> dict[str, object]:
            return {"type": "http.request", "body": b""}

        async def send(message: object) -> None:
            return None

        scope = {"type": "http", "client": ("10.0.0.1", port)}
        await app(scope, receive, send)

    async def many_short_connections() -> None:
        for port in range(5000):
            now[0] += 0.01  # 100 new connections a second, each gone after one call
            await call(port)

    asyncio.run(many_short_connections())
    # At most about a second's worth of connections (100) after the last sweep's doubling.
    assert len(app.opened) <= 1024
