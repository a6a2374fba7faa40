"""The cap on request bodies: refused with 413 in the error envelope as soon as the declared
`Content-Length`, or the bytes counted as they arrive, pass it, before anything parses them.

FastAPI's own `max_body_size` answers a declared oversize body with a plain-text 413 that
replaces any response, so it cannot keep the envelope; this middleware does the same counting
and raises an `HTTPException` from `receive`, which FastAPI hands to the error handlers
unchanged. Dataset uploads and predict count their bodies against their own, larger caps
(`THAW_MAX_UPLOAD_BYTES`; `THAW_MAX_PREDICT_*`), so they pass through.
"""

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_body


def capped_by_route(method: str, path: str) -> bool:
    """Whether the route counts its own body: a dataset upload, a predict call or an Open
    Inference Protocol infer call (whose cap follows the model's input size)."""
    return method == "POST" and (
        path == "/v1/datasets"
        or path.endswith("/predict")
        or (path.startswith("/v2/models/") and path.endswith("/infer"))
    )


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.message = f"The request body is over the {max_bytes}-byte limit."

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or capped_by_route(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > self.max_bytes:
            refusal = JSONResponse(error_body("payload_too_large", self.message), 413)
            await refusal(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self.message)
            return message

        await self.app(scope, counted, send)
