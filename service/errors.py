"""The error envelope `{"error": {"code", "message", "param"}}`: right status, never a trace."""

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.jobs.states import IllegalTransitionError

logger = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    code: str
    message: str
    param: str | None = None


class ErrorEnvelope(BaseModel):
    """Every error answer: a machine `code`, a sentence for people, and the field at fault."""

    error: ErrorDetail


def _documented(description: str) -> dict[str, Any]:
    return {"model": ErrorEnvelope, "description": description}


# Declared on every operation so clients (and Postman) know the shape of every failure.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _documented("Malformed request."),
    401: _documented("Missing or invalid API key."),
    404: _documented("Not found in your tenant."),
    409: _documented("The resource is in a state that does not allow this."),
    413: _documented("Too large."),
    415: _documented("Unsupported content type."),
    422: _documented("A field is invalid; `param` names it, `details` lists every problem."),
    429: _documented("Too many requests; see Retry-After."),
    503: _documented("A dependency is unavailable or the server is overloaded; retry later."),
}


ECHO_CHARS = 64
"""An error message quotes at most this much of what the client sent."""
LISTED_DETAILS = 5
"""A 422 lists this many problems at most, and says how many more there were."""


def echo(value: object) -> str:
    """`value` quoted for an error message: escaped (`repr`), and cut to a short prefix, so an
    answer never grows with the input (a 10 MB id is not sent back)."""
    text = str(value)
    if len(text) <= ECHO_CHARS:
        return repr(text)
    return f"{text[:ECHO_CHARS]!r}... ({len(text)} characters)"


def not_found(kind: str, ident: str) -> ApiError:
    return ApiError(
        404, f"{kind}_not_found", f"No {kind} {echo(ident)} in this tenant.", param=kind
    )


def error_body(code: str, message: str, param: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "param": param, **extra}}


STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    503: "unavailable",
}


def _param_of(loc: tuple[Any, ...]) -> str:
    # Drop the "body"/"query" prefix so `param` names the field as the client wrote it, and
    # the union member pydantic tried (`lr.constrained-float`, `lr.literal['auto']`).
    parts = [str(p) for p in loc[1:]] if loc and loc[0] in ("body", "query", "path") else loc
    if loc and loc[0] == "body":
        parts = [part for part in parts if not _UNION_MEMBER.fullmatch(str(part))]
    # An unknown key is the client's text: named, but never at length.
    return ".".join(str(p) if len(str(p)) <= ECHO_CHARS else echo(p) for p in parts)


_UNION_MEMBER = re.compile(r".*[-\[].*")
"""No body field's name or list index has a dash or a bracket; pydantic's names of union
members do."""


def _methods_for_path(request: Request) -> set[str]:
    """The documented methods of the path template that routes this request.

    Like the router, a literal segment (`/v1/jobs/plan`) wins over a parameter (`{job_id}`).
    """
    matches = [
        (template.count("{"), operations)
        for template, operations in request.app.openapi()["paths"].items()
        if re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", template), request.url.path)
    ]
    if not matches:
        return set()
    fewest = min(count for count, _ in matches)
    return {m.upper() for count, ops in matches if count == fewest for m in ops}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(
            error_body(exc.code, exc.message, exc.param), exc.status, headers=exc.headers
        )

    @app.exception_handler(IllegalTransitionError)
    async def _illegal_transition(_: Request, exc: IllegalTransitionError) -> JSONResponse:
        # A route that knows better (cancel: `job_not_cancellable`) answers before this; any
        # other transition refused by the job's state is a conflict, never a 500.
        return JSONResponse(error_body("illegal_transition", str(exc), "job_id"), 409)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        details = [
            {"param": _param_of(tuple(err["loc"])), "message": err["msg"], "type": err["type"]}
            for err in errors[:LISTED_DETAILS]
        ]
        param = str(details[0]["param"]) if details else None
        message = str(details[0]["message"]) if details else "invalid request"
        if len(errors) > LISTED_DETAILS:
            message += f" (and {len(errors) - 1} more problems; `details` lists {LISTED_DETAILS})"
        return JSONResponse(
            error_body(
                "invalid_request",
                f"{param}: {message}" if param else message,
                param,
                details=details,
                more_details=max(0, len(errors) - LISTED_DETAILS),
            ),
            422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = STATUS_CODES.get(exc.status_code, "error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names only the first route matching the path, but several routes
            # (GET, PATCH, DELETE) can share one, and `Allow` must list all their methods.
            headers["Allow"] = ", ".join(sorted(_methods_for_path(request)))
        return JSONResponse(error_body(code, str(exc.detail)), exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(
            error_body("internal_error", "Something went wrong on our side; it was logged."), 500
        )
