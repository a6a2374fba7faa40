import asyncio
import binascii
import time
from base64 import b64decode
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, NoReturn

import orjson
from fastapi import APIRouter, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service.auth.keycache import ApiKeyCache
from service.auth.service import hash_key
from service.bounds import VersionRef
from service.context import AppContext
from service.db import new_id
from service.deps import _bearer as bearer
from service.deps import get_tenant, load_model, load_version, take_rate_token
from service.errors import ApiError, echo
from service.inference.metrics import InferenceMetrics
from service.inference.resolution import ResolutionCache, ServedVersion
from service.inference.schemas import (
    PREDICT_JSON_EXAMPLE,
    PREDICT_TEXT_EXAMPLE,
    PredictJson,
    PredictOptions,
    PredictOut,
    PredictTextJson,
)
from service.inference.service import (
    LoadedModel,
    ModelCache,
    ModelUnloadedError,
    QueueFullError,
    Reservation,
    decode_pool,
    fill_predictions,
    predict_reading,
    resolve_pool,
)
from service.monitoring.service import Recorder
from worker.engine.modalities import modality_for

Credentials = HTTPAuthorizationCredentials | None

router = APIRouter(prefix="/v1/models", tags=["inference"])

# Seconds a client refused for a full queue is told to wait: a few forward passes' worth.
RETRY_AFTER_SECONDS = 1

_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "multipart/form-data": {
            # Files cannot be shown inline: curl sends them with -F images=@a.png.
            "example": {"top_k": 3, "task": "digits"},
            "schema": {
                "type": "object",
                "required": ["images"],
                "properties": {
                    "images": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": "Images to classify, one part per image.",
                    },
                    "top_k": {"type": "integer", "minimum": 1, "maximum": 100, "default": 5},
                    "task": {"type": "string"},
                    "calibrated": {"type": "boolean", "default": True},
                },
            },
        },
        "application/json": {
            "schema": {
                "oneOf": [PredictJson.model_json_schema(), PredictTextJson.model_json_schema()]
            },
            "examples": {
                "images": {"summary": "An image model", "value": PREDICT_JSON_EXAMPLE},
                "texts": {"summary": "A text model", "value": PREDICT_TEXT_EXAMPLE},
            },
        },
    },
}


def _too_many(limit: int) -> ApiError:
    return ApiError(413, "too_many_images", f"At most {limit} images per call.", param="images")


@dataclass(frozen=True)
class _Body:
    """A predict call's inputs and its options: `items` as sent in field `param` (a modality's
    `input_param`): images as (name, bytes or None), or texts."""

    param: str
    items: list[Any]
    top_k: int
    task: str | None
    calibrated: bool


def _too_large(name: str, limit: int) -> ApiError:
    return ApiError(413, "image_too_large", f"{name} is over {limit} bytes.", param="images")


async def _read_multipart(request: Request, context: AppContext) -> _Body:
    settings = context.settings
    # One file over the cap is read so that "too many" is answered as such (413); the parser
    # stops at the one after it, and its refusal is the same 413.
    try:
        form = await request.form(max_files=settings.max_predict_images + 1, max_fields=10)
    except StarletteHTTPException as exc:
        if str(exc.detail).startswith("Too many files"):
            raise _too_many(settings.max_predict_images) from None
        raise
    uploads = [item for item in form.getlist("images") if isinstance(item, UploadFile)]
    if not uploads:
        raise ApiError(422, "invalid_request", "images: at least one file is required", "images")
    if len(uploads) > settings.max_predict_images:
        raise _too_many(settings.max_predict_images)
    images: list[tuple[str, bytes | None]] = []
    for upload in uploads:
        data = await upload.read(settings.max_predict_bytes + 1)
        if len(data) > settings.max_predict_bytes:
            raise _too_large(upload.filename or f"image-{len(images)}", settings.max_predict_bytes)
        images.append((upload.filename or f"image-{len(images)}", data))
    names = ("top_k", "task", "calibrated")
    fields = {key: form.get(key) for key in names if form.get(key) is not None}
    try:
        options = PredictOptions.model_validate(fields)
    except ValidationError as exc:
        _raise_validation(exc)
    return _Body("images", images, options.top_k, options.task, options.calibrated)


async def _read_json(request: Request, context: AppContext) -> _Body:
    settings = context.settings
    # Base64 takes 4 bytes per 3, plus room for names and the JSON around them; a text may
    # take 4 bytes a character escaped, and a longer one is still read to be reported.
    cap = (
        max(
            settings.max_predict_images * (settings.max_predict_bytes * 4 // 3 + 1024),
            settings.max_predict_texts * (settings.max_predict_text_chars * 4 + 1024),
        )
        + 65536
    )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise ApiError(413, "payload_too_large", f"The body is over {cap} bytes.", "images")
    try:
        raw = orjson.loads(bytes(body))
    except orjson.JSONDecodeError:
        raw = None
    if isinstance(raw, dict) and "texts" in raw:
        try:
            texts = PredictTextJson.model_validate(raw)
        except ValidationError as exc:
            _raise_validation(exc)
        if len(texts.texts) > settings.max_predict_texts:
            raise ApiError(
                413,
                "too_many_texts",
                f"At most {settings.max_predict_texts} texts per call.",
                param="texts",
            )
        return _Body("texts", texts.texts, texts.top_k, texts.task, texts.calibrated)
    try:
        parsed = PredictJson.model_validate_json(bytes(body))
    except ValidationError as exc:
        _raise_validation(exc)
    if len(parsed.images) > settings.max_predict_images:
        raise _too_many(settings.max_predict_images)
    images: list[tuple[str, bytes | None]] = []
    for index, image in enumerate(parsed.images):
        name = image.name or f"image-{index}"
        try:
            data: bytes | None = b64decode(image.data, validate=True)
        except (binascii.Error, ValueError):
            data = None  # reported for this image alone, like an unreadable file
        if data is not None and len(data) > settings.max_predict_bytes:
            raise _too_large(name, settings.max_predict_bytes)
        images.append((name, data))
    return _Body("images", images, parsed.top_k, parsed.task, parsed.calibrated)


def _raise_validation(exc: ValidationError) -> NoReturn:
    # Through FastAPI's own handler, so the envelope names the field like any other 422.
    raise RequestValidationError(
        [{**error, "loc": ("body", *error["loc"])} for error in exc.errors(include_url=False)]
    )


def _resolve_from_caches(
    request: Request, credentials: Credentials, name: str, ref: str
) -> ServedVersion | None:
    """`_resolve` answered from the process's caches alone, on the event loop: the key and the
    version both cached and every check local (no Redis: the change generations are files and
    the rate limit is this process's), so nothing here waits on the network. Saves the thread
    hop and the session that most calls would pay for dictionary lookups; None sends the call
    the long way, which repeats the checks."""
    state = request.app.state
    context: AppContext = state.context
    if credentials is None or context.settings.shared_redis_url is not None:
        return None
    # As `get_tenant` does: the shared generations first, so no cache answers stale.
    context.changes.sync()
    keys: ApiKeyCache = state.api_keys
    key = keys.get(hash_key(credentials.credentials))
    if key is None:
        return None
    resolutions: ResolutionCache = state.resolutions
    served = resolutions.get((key.tenant.id, name, ref))
    if served is not None:
        take_rate_token(request, key.key_id)
    return served


def _resolve(request: Request, credentials: Credentials, name: str, ref: str) -> ServedVersion:
    """The caller's tenant (the key is checked on every call), then the version it names,
    from the resolution cache when it can; the session is closed before the call goes on."""
    context: AppContext = request.app.state.context
    resolutions: ResolutionCache = request.app.state.resolutions
    with context.db.session() as session:
        tenant = get_tenant(request, session, credentials)
        key = (tenant.id, name, ref)
        served = resolutions.get(key)
        if served is None:
            generation = resolutions.generation()
            model = load_model(name, session, tenant)
            served = ServedVersion.of(load_version(model, ref, session))
            resolutions.put(key, served, generation=generation)
    return served


def _captured(
    model: LoadedModel, items: list[Any], good: list[int], served: ServedVersion
) -> list[bytes] | None:
    """The answered inputs as sent, when the model keeps them (capture); references, no copy
    of an image."""
    if not served.capture:
        return None
    return [model.inputs.kept_bytes(items[index]) for index in good]


def _overloaded(message: str) -> ApiError:
    return ApiError(503, "overloaded", message, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


async def _reserve(
    cache: ModelCache, version: ServedVersion, model: LoadedModel, count: int
) -> tuple[LoadedModel, Reservation]:
    """Room for `count` inputs in the model's queue, before any is decoded: a call the queue
    cannot take is refused before it costs anything."""
    for _ in range(2):
        assert model.batcher is not None
        try:
            return model, model.batcher.reserve(count)
        except ModelUnloadedError:
            # Unloaded between lookup and reserve (cache pressure): load it again, once.
            model = await run_in_threadpool(cache.get, version)
        except QueueFullError:
            raise _overloaded(
                "Too many predict calls are waiting for this model; retry shortly."
            ) from None
    raise _overloaded("The model cache is too small for the models in use; retry shortly.")


@router.post(
    "/{name}/versions/{version}/predict",
    summary="Classify images or texts with a model version",
    description="Send images as multipart field `images` (once per image) or as JSON "
    '`{"images": [{"name": "a.png", "data": "<base64>"}], "top_k": 3}`; a text model takes '
    '`{"texts": ["...", "..."], "top_k": 3}`. Answers the top-k labels per input, in the '
    "order sent (texts by `text_index`, with `truncated` when a text was longer than the "
    "model reads); an image that cannot be read, or an empty or oversized text, gets an "
    "`error` entry instead of failing the call. Sending images to a text model, or texts to "
    "an image model, is a 422 naming what the model takes. Calls for the same version are "
    "batched together; when too many wait, the answer is 503 with `Retry-After`.\n\n"
    "`curl -H 'Authorization: Bearer $KEY' -F images=@a.png -F images=@b.png "
    ".../v1/models/digits/versions/production/predict`",
    # The key is read by calling `bearer` in the route rather than through `Depends`, which
    # cost ~40 us a call in FastAPI's dependency solving; the schema still declares it.
    openapi_extra={"requestBody": _REQUEST_BODY, "security": [{bearer.scheme_name: []}]},
    response_model=PredictOut,
)
async def predict(
    request: Request,
    name: Annotated[str, Path(description="Model name, unique in your tenant.")],
    version: VersionRef,
) -> Response:
    # Admission first, before the key is even checked: under a load this process cannot
    # serve, refusing costs next to nothing and the accepted calls keep a bounded latency.
    # Only the event loop touches the count, so it needs no lock.
    state = request.app.state
    if state.predicts_in_flight >= state.context.settings.predict_max_in_flight:
        state.inference_metrics.rejected_at_admission.inc()
        raise _overloaded(
            "This server is working on as many predict calls as it can; retry shortly."
        )
    state.predicts_in_flight += 1
    try:
        return await _predict(request, await bearer(request), name, version)
    finally:
        state.predicts_in_flight -= 1


async def _predict(request: Request, credentials: Credentials, name: str, version: str) -> Response:
    # The lean path: no thread hop for a cached key and version (a hop cost more than those
    # dictionary lookups) nor for a loaded model, one for decoding (Pillow and the tokenizer
    # work outside the GIL there, beside the event loop), one into the batcher; the answer
    # encoded by orjson without a response model pass.
    loop = asyncio.get_running_loop()
    served = _resolve_from_caches(request, credentials, name, version)
    if served is None:
        resolve = partial(_resolve, request, credentials, name, version)
        served = await loop.run_in_executor(resolve_pool(), resolve)
    context: AppContext = request.app.state.context
    content_type = request.headers.get("content-type", "")
    try:
        if content_type.startswith("multipart/form-data"):
            body = await _read_multipart(request, context)
        elif content_type.startswith("application/json"):
            body = await _read_json(request, context)
        else:
            raise ApiError(
                415,
                "unsupported_media_type",
                "Send multipart/form-data (field `images`) or application/json.",
            )
    except ClientDisconnect:
        # The caller hung up mid-body: nobody reads an answer, and it is no server error.
        return Response(status_code=400)
    started = time.perf_counter()
    cache: ModelCache = request.app.state.predictors
    metrics: InferenceMetrics = request.app.state.inference_metrics
    labels = (served.id,)
    # Loading is slow and CPU-bound: keep it off the event loop.
    model = cache.peek(served)
    if model is None:
        model = await run_in_threadpool(cache.get, served)
    task = body.task
    if task is not None and task not in model.tasks:
        raise ApiError(
            422,
            "unknown_task",
            f"task: this model answers {', '.join(model.tasks)}, not {echo(task)}.",
            param="task",
        )
    modality = modality_for(model.modality)
    if body.param != modality.input_param:
        raise ApiError(422, "wrong_input_kind", modality.wrong_input, param=body.param)
    answered = task or list(model.tasks)[-1]
    metrics.images.labels(*labels).inc(len(body.items))
    # The batcher counts rows: an image is one per test-time view (`preprocessing.tta`).
    count = len(body.items) * model.inputs.views
    model, reservation = await _reserve(cache, served, model, count)
    try:
        prepare = partial(model.inputs.prepare, body.items, predict_reading(context))
        results, good, inputs = await loop.run_in_executor(decode_pool(), prepare)
        if good:
            outputs = await asyncio.wrap_future(reservation.submit(inputs))
            fill_predictions(
                model,
                results,
                good,
                outputs,
                task=answered,
                top_k=body.top_k,
                calibrated=body.calibrated,
            )
            recorder: Recorder | None = request.app.state.monitor
            if recorder is not None:
                # Every answered input gets an id its true label can be fed back under.
                prediction_ids = [new_id("pr") for _ in good]
                for index, prediction_id in zip(good, prediction_ids, strict=True):
                    results[index]["prediction_id"] = prediction_id
                recorder.record(
                    served,
                    model,
                    prediction_ids,
                    outputs,
                    inputs=_captured(model, body.items, good, served),
                )
    finally:
        reservation.release()
    metrics.request_seconds.labels(*labels).observe(time.perf_counter() - started)
    response = {
        "model": served.model_name,
        "version": served.version,
        "task": answered,
        "predictions": results,
    }
    return Response(orjson.dumps(response), media_type="application/json")
