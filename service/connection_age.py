"""A keep-alive connection's maximum age: past it, the next response says `Connection: close`
and the client opens a new connection for its next call.

Why: `thaw api` serves one port from several processes sharing one listening socket, and a
process accepts every connection pending when it wakes. A client that opens a few long-lived
connections at once (a Triton client sending 32-image batches on four) can land all of them
on one process and leave the others idle for as long as the connections live. Reconnecting
lets the kernel hand the new connection to whichever process accepts first, most often an
idle one, so the load spreads within seconds. Servers do this for the same reason: gRPC's
`MAX_CONNECTION_AGE`, nginx's `keepalive_requests`, Envoy's `max_connection_duration`.

A connection is known by its client address (host and port), unique among the open
connections of one process; the first call seen on it starts its age. A closed connection's
entry is dropped once it is past the age (a new connection on the same port then starts
afresh).
"""

import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

CLOSE = (b"connection", b"close")


class ConnectionAgeMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_age_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app = app
        self.max_age = max_age_seconds
        self.clock = clock
        self.opened: dict[tuple[str, int], float] = {}
        self.sweep_at = 1024

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        if scope["type"] != "http" or not client or not self._past_age(tuple(client)):
            await self.app(scope, receive, send)
            return

        async def closing(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), CLOSE]
            await send(message)

        await self.app(scope, receive, closing)

    def _past_age(self, client: tuple[str, int]) -> bool:
        now = self.clock()
        if len(self.opened) >= self.sweep_at:
            # Connections the clients closed leave entries behind: drop those past the age
            # (a still-open one among them only starts its age again).
            self.opened = {c: t for c, t in self.opened.items() if now - t < self.max_age}
            self.sweep_at = max(1024, 2 * len(self.opened))
        opened = self.opened.setdefault(client, now)
        if now - opened < self.max_age:
            return False
        del self.opened[client]
        return True
