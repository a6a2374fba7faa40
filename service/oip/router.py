"""The Open Inference Protocol (v2) over REST, beside `/v1`: what Triton and KServe clients
call. Same keys, tenants, rate limits, admission, batchers and metrics as predict (the calls go
through `service.inference`'s resolution and model cache); errors in the protocol's own shape,
`{"error": "<message>"}`, with the status predict would give."""

import asyncio
import time
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from service.context import AppContext
from service.deps import _bearer as bearer
from service.deps import get_tenant, load_model
from service.errors import ERROR_RESPONSES, ApiError
from service.inference.metrics import InferenceMetrics
from service.inference.resolution import ResolutionCache, ServedVersion
from service.inference.router import (
    Credentials,
    _overloaded,
    _reserve,
    _resolve,
    _resolve_from_caches,
)
from service.inference.service import (
    LoadedModel,
    ModelCache,
    decode_pool,
    predict_reading,
    probabilities,
    resolve_pool,
)
from service.oip.schemas import ModelMetadata, ProtocolError, ServerMetadata, TensorMetadata
from service.oip.service import (
    PROBABILITIES,
    TOP_LABELS,
    InferRequest,
    bad_request,
    default_version,
    infer_response,
    parse_infer_request,
)
from worker.engine.artifacts import CONFIG_FILE, ModelConfig, parse_model_config
from worker.engine.modalities import modality_for
from worker.engine.modalities.base import OipInput

DEFAULT_REF = ""
"""The resolution cache's key for "no version named" (a path segment is never empty)."""

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class OipRoute(APIRoute):
    """Answers thaw's errors in the protocol's shape: `{"error": "<message>"}`."""

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as exc:
                return JSONResponse({"error": exc.message}, exc.status, headers=exc.headers)
            except ClientDisconnect:
                return Response(status_code=400)

        return answer


router = APIRouter(
    prefix="/v2",
    tags=["open inference protocol"],
    route_class=OipRoute,
    # The app's error responses, in the protocol's shape rather than thaw's envelope.
    responses={
        status: {"model": ProtocolError, "description": documented["description"]}
        for status, documented in ERROR_RESPONSES.items()
    },
)

NamePath = Annotated[str, Path(description="Model name, unique in your tenant.")]
VersionPath = Annotated[str, Path(description="Version number, or an alias such as `production`.")]
_SECURED: dict[str, Any] = {"security": [{bearer.scheme_name: []}]}


@router.get("", summary="Server metadata (OIP)")
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name="thaw", version="0.1.0", extensions=["binary_tensor_data"])


@router.get("/health/live", summary="The server is live (OIP)")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="The server can serve: its database answers (OIP)")
async def ready(request: Request) -> dict[str, bool]:
    context: AppContext = request.app.state.context

    def check() -> None:
        with context.db.session() as session:
            session.execute(text("SELECT 1"))

    try:
        await run_in_threadpool(check)
    except Exception:
        raise ApiError(503, "not_ready", "The database is unreachable.") from None
    return {"ready": True}


async def _served(request: Request, name: str, ref: str) -> ServedVersion:
    """The caller's version (the key checked, a rate token taken), as predict resolves it."""
    credentials = await bearer(request)
    served = _resolve_from_caches(request, credentials, name, ref)
    if served is not None:
        return served
    resolve = partial(
        _resolve_default if ref == DEFAULT_REF else _resolve, request, credentials, name, ref
    )
    return await asyncio.get_running_loop().run_in_executor(resolve_pool(), resolve)


def _resolve_default(
    request: Request, credentials: Credentials, name: str, ref: str
) -> ServedVersion:
    """`_resolve` for a call that names no version (`default_version`)."""
    context: AppContext = request.app.state.context
    resolutions: ResolutionCache = request.app.state.resolutions
    with context.db.session() as session:
        tenant = get_tenant(request, session, credentials)
        key = (tenant.id, name, ref)
        served = resolutions.get(key)
        if served is None:
            generation = resolutions.generation()
            model = load_model(name, session, tenant)
            row = default_version(session, model=model)
            if row is None:
                raise ApiError(404, "version_not_found", f"Model {name!r} has no version.")
            served = ServedVersion.of(row)
            resolutions.put(key, served, generation=generation)
    return served


async def _config(request: Request, served: ServedVersion) -> ModelConfig:
    """The version's `config.json`, read from the store (metadata needs no loaded model)."""
    context: AppContext = request.app.state.context

    def read() -> ModelConfig:
        raw = context.store.get_bytes(f"{served.artifact_prefix}/{CONFIG_FILE}")
        return parse_model_config(orjson.loads(raw))

    return await run_in_threadpool(read)


def _metadata(served: ServedVersion, config: ModelConfig) -> ModelMetadata:
    labels = list(config.labels)
    inputs = [TensorMetadata(**spec) for spec in modality_for(config.modality).oip_inputs(config)]
    return ModelMetadata(
        name=served.model_name,
        versions=[str(served.version)],
        platform="thaw",
        inputs=inputs,
        outputs=[
            TensorMetadata(
                name=PROBABILITIES,
                datatype="FP32",
                shape=[-1, len(labels)],
                parameters={"labels": labels, "tasks": config.task_labels()},
            ),
            TensorMetadata(
                name=TOP_LABELS,
                datatype="BYTES",
                shape=[-1, -1],
                parameters={"top_k": "request parameter `top_k`, default 5"},
            ),
        ],
    )


@router.get(
    "/models/{name}",
    summary="Model metadata (OIP)",
    openapi_extra=_SECURED,
    response_model_exclude_none=True,
)
async def model_metadata(request: Request, name: NamePath) -> ModelMetadata:
    served = await _served(request, name, DEFAULT_REF)
    return _metadata(served, await _config(request, served))


@router.get(
    "/models/{name}/versions/{version}",
    summary="Model version metadata (OIP)",
    openapi_extra=_SECURED,
    response_model_exclude_none=True,
)
async def version_metadata(request: Request, name: NamePath, version: VersionPath) -> ModelMetadata:
    served = await _served(request, name, version)
    return _metadata(served, await _config(request, served))


@router.get("/models/{name}/ready", summary="The model can serve (OIP)", openapi_extra=_SECURED)
async def model_ready(request: Request, name: NamePath) -> dict[str, Any]:
    served = await _served(request, name, DEFAULT_REF)
    return {"name": served.model_name, "version": str(served.version), "ready": True}


@router.get(
    "/models/{name}/versions/{version}/ready",
    summary="The model version can serve (OIP)",
    openapi_extra=_SECURED,
)
async def version_ready(request: Request, name: NamePath, version: VersionPath) -> dict[str, Any]:
    served = await _served(request, name, version)
    return {"name": served.model_name, "version": str(served.version), "ready": True}


_INFER_DESCRIPTION = (
    "A JSON inference request, optionally followed by the binary tensor data extension's raw "
    "little-endian bytes (the JSON's length in `Inference-Header-Content-Length`). An image "
    "model takes `images` (FP32, `(B, 3, H, W)`, preprocessed: straight to the batcher) or "
    "`image_bytes` (BYTES, encoded images); a text model `texts` (BYTES). Outputs: "
    "`probabilities` (FP32 `(B, C)`) and `top_labels` (BYTES `(B, k)`); request parameters "
    "`top_k`, `task`, `calibrated`."
)


@router.post(
    "/models/{name}/infer",
    summary="Infer (OIP)",
    description=_INFER_DESCRIPTION,
    openapi_extra=_SECURED,
)
async def infer(request: Request, name: NamePath) -> Response:
    return await _admitted(request, name, DEFAULT_REF)


@router.post(
    "/models/{name}/versions/{version}/infer",
    summary="Infer with a version (OIP)",
    description=_INFER_DESCRIPTION,
    openapi_extra=_SECURED,
)
async def infer_version(request: Request, name: NamePath, version: VersionPath) -> Response:
    return await _admitted(request, name, version)


async def _admitted(request: Request, name: str, ref: str) -> Response:
    # Predict's admission: the same count, so both kinds of call share the process's bound.
    state = request.app.state
    if state.predicts_in_flight >= state.context.settings.predict_max_in_flight:
        state.inference_metrics.rejected_at_admission.inc()
        raise _overloaded("This server is working on as many calls as it can; retry shortly.")
    state.predicts_in_flight += 1
    try:
        return await _infer(request, name, ref)
    finally:
        state.predicts_in_flight -= 1


async def _read_body(request: Request, cap: int) -> bytearray:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise ApiError(413, "payload_too_large", f"The body is over {cap} bytes.")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise ApiError(413, "payload_too_large", f"The body is over {cap} bytes.")
    return body


def _the_input(parsed: InferRequest, model: LoadedModel, context: AppContext) -> OipInput:
    """The one input this model takes, checked against it and read."""
    accepted = model.inputs.oip_input_names
    if len(parsed.inputs) != 1 or parsed.inputs[0].name not in accepted:
        sent = ", ".join(repr(tensor.name) for tensor in parsed.inputs)
        raise bad_request(f"This model takes one input, {' or '.join(accepted)}; got {sent}.")
    try:
        return model.inputs.oip_input(parsed.inputs[0], context.settings)
    except ValueError as exc:
        raise bad_request(str(exc)) from None


async def _infer(request: Request, name: str, ref: str) -> Response:
    loop = asyncio.get_running_loop()
    served = await _served(request, name, ref)
    context: AppContext = request.app.state.context
    cache: ModelCache = request.app.state.predictors
    metrics: InferenceMetrics = request.app.state.inference_metrics
    model = cache.peek(served)
    if model is None:
        model = await run_in_threadpool(cache.get, served)
    body = await _read_body(request, model.inputs.body_cap(context.settings))
    started = time.perf_counter()
    header_length = request.headers.get("inference-header-content-length")
    parsed = parse_infer_request(body, header_length)
    read = _the_input(parsed, model, context)
    task = parsed.parameters.get("task")
    if task is not None and task not in model.tasks:
        raise bad_request(f"task: this model answers {', '.join(model.tasks)}, not {task!r}.")
    answered = task or list(model.tasks)[-1]
    top_k = parsed.parameters.get("top_k", 5)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= 100:
        raise bad_request("top_k: an integer from 1 to 100.")
    calibrated = parsed.parameters.get("calibrated", True)
    if not isinstance(calibrated, bool):
        raise bad_request("calibrated: true or false.")
    count = len(read.items)
    if count > read.limit:
        name = parsed.inputs[0].name
        raise ApiError(413, "too_many_inputs", f"At most {read.limit} {name} per call.")
    labels = (served.id,)
    metrics.images.labels(*labels).inc(count)
    # Encoded images are decoded into one row per test-time view, as predict does.
    views = read.views
    model, reservation = await _reserve(cache, served, model, count * views)
    try:
        if read.preprocessed:
            inputs: Any = read.items  # the fast path: straight to the batcher
        else:
            prepare = partial(model.inputs.prepare, read.items, predict_reading(context))
            results, _, inputs = await loop.run_in_executor(decode_pool(), prepare)
            _refuse_failed(results, read.item)
        outputs = await asyncio.wrap_future(reservation.submit(inputs))
    finally:
        reservation.release()
    rows = probabilities(model, outputs.logits, task=answered, calibrated=calibrated, views=views)
    classes = model.tasks[answered]
    k = min(top_k, len(classes))
    top = np.argsort(-rows, axis=1, kind="stable")[:, :k]
    top_labels = [[classes[i] for i in row] for row in top.tolist()]
    content, json_length = infer_response(
        model_name=served.model_name,
        version=served.version,
        request=parsed,
        task=answered,
        probabilities=rows,
        top_labels=top_labels,
    )
    metrics.request_seconds.labels(*labels).observe(time.perf_counter() - started)
    if json_length is None:
        return Response(content, media_type="application/json")
    return Response(
        content,
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(json_length)},
    )


def _refuse_failed(results: list[dict[str, Any]], kind: str) -> None:
    """A tensor call is all or nothing: the first input that could not be read fails it."""
    for index, result in enumerate(results):
        if result.get("error"):
            raise bad_request(f"{kind} {index}: {result['error']['message']}")
