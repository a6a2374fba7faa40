"""The FastAPI application."""

import gc
import hmac
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy import text

from service.auth.keycache import ApiKeyCache
from service.auth.ratelimit import make_rate_limiter
from service.auth.router import router as auth_router
from service.base_models.router import router as base_models_router
from service.body_limit import BodyLimitMiddleware
from service.connection_age import ConnectionAgeMiddleware
from service.context import AppContext
from service.datasets.router import router as datasets_router
from service.errors import ERROR_RESPONSES, ApiError, error_body, install_error_handlers
from service.experiments.router import router as experiments_router
from service.inference.metrics import InferenceMetrics
from service.inference.resolution import ResolutionCache
from service.inference.router import router as inference_router
from service.inference.service import ModelCache
from service.jobs.reaper import start_reaper
from service.jobs.router import router as jobs_router
from service.models.router import router as models_router
from service.models.router import search_router as model_search_router
from service.monitoring.router import router as monitoring_router
from service.monitoring.service import Recorder
from service.oip.router import router as oip_router
from service.queues import consumer_registry
from service.replicas import API_KEYS, MODELS
from service.settings import Settings, get_settings
from service.storage import StorageError
from service.supervision import WorkerRestarts, restarts_file, stranded_queues
from service.ui.router import router as ui_router
from service.updates.router import router as updates_router
from service.webhooks.delivery import WebhookSender
from service.webhooks.router import router as webhooks_router

logger = logging.getLogger(__name__)

scrape_bearer = HTTPBearer(
    auto_error=False, scheme_name="MetricsToken", description="`THAW_METRICS_TOKEN`, when set."
)

DESCRIPTION = """
Upload an image dataset, pick a pretrained backbone and a transfer strategy, and get back a
registered, versioned model with metrics and an inference endpoint.

Every call under `/v1` takes `Authorization: Bearer <api key>` (`thaw keys create --tenant TEAM`).
Errors are `{"error": {"code", "message", "param"}}`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    context = AppContext(settings or get_settings())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        stop = threading.Event()
        reaper = start_reaper(context, interval=context.settings.reaper_interval_seconds, stop=stop)
        webhooks = WebhookSender(context, metrics)
        app.state.webhooks = webhooks
        # What the process built at startup lives as long as it does: moved out of the cyclic
        # collector's reach (after one collection, so no garbage is kept), a full collection
        # no longer walks ~200k objects, which took 2 s on a loaded 2-core host with the GIL
        # held: every request in flight waited. The model cache does the same after a load.
        gc.collect()
        gc.freeze()
        yield
        stop.set()
        reaper.join(timeout=5)
        webhooks.close()
        predictors.close()
        if recorder is not None:
            recorder.close()
        metrics.close()

    app = FastAPI(
        title="thaw",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        responses=ERROR_RESPONSES,
    )
    app.add_middleware(BodyLimitMiddleware, max_bytes=context.settings.max_json_body_bytes)
    if (max_age := context.settings.resolved_connection_max_age_seconds) > 0:
        app.add_middleware(ConnectionAgeMiddleware, max_age_seconds=max_age)
    app.state.context = context
    app.state.rate_limiter = make_rate_limiter(context.settings)
    api_keys = ApiKeyCache(ttl_seconds=context.settings.api_key_cache_seconds)
    context.changes.on_change(API_KEYS, api_keys.clear)
    app.state.api_keys = api_keys
    metrics = InferenceMetrics()
    predictors = ModelCache(store=context.store, settings=context.settings, metrics=metrics)
    app.state.inference_metrics = metrics
    app.state.predictors = predictors
    recorder = Recorder(context, metrics) if context.settings.monitor else None
    app.state.monitor = recorder
    resolutions = ResolutionCache(ttl_seconds=context.settings.resolution_cache_seconds)
    resolutions.watch(context.db.sessionmaker)
    context.changes.on_change(MODELS, resolutions.invalidate)
    app.state.resolutions = resolutions
    app.state.predicts_in_flight = 0

    @app.get("/healthz", tags=["ops"], summary="The process is up")
    async def healthz() -> dict[str, str]:
        # async: answered on the event loop, without a thread-pool hop.
        return {"status": "ok"}

    # Restarts of `thaw serve`'s workers: its supervisor's file, the same for every process.
    supervision_metrics = CollectorRegistry()
    supervision_metrics.register(WorkerRestarts(restarts_file(context.settings)))
    consumers = consumer_registry(context.settings)

    def scrape() -> Response:
        exposition = metrics.exposition() + generate_latest(supervision_metrics)
        return Response(exposition, media_type=CONTENT_TYPE_LATEST)

    metrics_route = app.get(
        "/metrics",
        tags=["ops"],
        summary="Prometheus metrics: predict latency, batch sizes, queue depth, model cache, "
        "worker restarts",
        description="With `THAW_METRICS_TOKEN` set, a scrape must send it as a bearer token.",
        response_class=Response,
    )
    token = context.settings.metrics_token
    # The schema declares the scrape token only where one is required, so it says what the
    # route does: open without a token configured (the embedded default), guarded with one.
    if token is None:
        metrics_route(scrape)
    else:

        @metrics_route
        def guarded_scrape(
            credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(scrape_bearer)],
        ) -> Response:
            sent = credentials.credentials if credentials else ""
            if not hmac.compare_digest(sent.encode(), token.encode()):
                raise ApiError(
                    401,
                    "unauthorized",
                    "Send the scrape token: `Authorization: Bearer <THAW_METRICS_TOKEN>`.",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            return scrape()

    @app.get(
        "/readyz",
        tags=["ops"],
        summary="Database, broker and storage are reachable, and every queue with work has a "
        "live worker",
    )
    def readyz() -> Any:
        checks: dict[str, str] = {}
        try:
            with context.db.session() as session:
                session.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"error: {type(exc).__name__}"
        try:
            with context.celery.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=2)
            checks["broker"] = "ok"
        except Exception as exc:
            checks["broker"] = f"error: {type(exc).__name__}"
        try:
            context.store.check()
            checks["storage"] = "ok"
        except StorageError as exc:
            checks["storage"] = f"error: {type(exc).__name__}"
        problems = [f"{name} unreachable" for name, value in checks.items() if value != "ok"]
        if checks["database"] == "ok":
            try:
                stranded = stranded_queues(context, consumers)
            except Exception as exc:
                checks["workers"] = f"error: {type(exc).__name__}"
                problems.append("the live-queue registry unreadable")
            else:
                checks["workers"] = "ok"
                if stranded:
                    checks["workers"] = "no live worker for " + ", ".join(stranded)
                    problems += [
                        f"no live worker consumes the {queue!r} queue, which has {count} "
                        "job(s) or dataset(s) to work on"
                        for queue, count in stranded.items()
                    ]
        if not problems:
            return {"status": "ready", "checks": checks}
        return JSONResponse(
            {**error_body("not_ready", f"Not ready: {'; '.join(problems)}."), "checks": checks},
            503,
        )

    install_error_handlers(app)
    # Routes are matched in order: the ops probes and predict, the hot paths, go first.
    for router in (
        inference_router,
        oip_router,
        auth_router,
        datasets_router,
        base_models_router,
        jobs_router,
        experiments_router,
        models_router,
        monitoring_router,
        webhooks_router,
        updates_router,
        model_search_router,
        ui_router,
    ):
        app.include_router(router)

    return app
