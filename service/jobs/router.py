from typing import Annotated

from fastapi import APIRouter, Body, Depends, Header, Query, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from service.deps import ContextDep, JobDep, SessionDep, TenantDep
from service.errors import ErrorEnvelope
from service.jobs import plots, service
from service.jobs.history import epoch_history
from service.jobs.schemas import (
    SPEC_EXAMPLE,
    STREAM_EXAMPLE,
    CheckpointOut,
    JobEventOut,
    JobMetricsOut,
    JobOut,
    JobSpec,
    LrFindOut,
    PlanOut,
    PreviewSpec,
)
from service.jobs.service import latest_checkpoint_key
from service.jobs.states import JobKind
from service.jobs.stream import SSE_EVENT_SCHEMA, job_event_stream, resume_cursor
from service.pagination import Page, PageParams, page_params, paginate
from service.storage import ObjectNotFoundError
from service.tables import Job, JobEvent

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

SpecBody = Annotated[JobSpec, Body(examples=[SPEC_EXAMPLE])]


@router.post("/plan", summary="Preview the resolved plan of a spec without running it")
def preview_plan(
    spec: Annotated[PreviewSpec, Body(examples=[SPEC_EXAMPLE])],
    session: SessionDep,
    context: ContextDep,
    tenant: TenantDep,
) -> PlanOut:
    _, _, preview = service.resolve_plan(
        session, context=context, tenant=tenant, spec=spec, model_name=spec.model
    )
    return preview


@router.post(
    "",
    status_code=201,
    summary="Submit a training job",
    description="Validates the spec, records its resolved plan and queues it. With an "
    "`Idempotency-Key` header a retried request returns the job the first one made (200).",
)
def create_job(
    spec: SpecBody,
    response: Response,
    context: ContextDep,
    tenant: TenantDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobOut:
    job, created = service.create_job(
        context=context, tenant=tenant, spec=spec, idempotency_key=idempotency_key
    )
    if not created:
        response.status_code = 200
    return JobOut.model_validate(job)


@router.post(
    "/lr-find",
    status_code=201,
    summary="Run the learning-rate finder on a spec's first stage (a short job)",
    description="Leslie Smith's range test: the spec's first stage trains for about 100 steps "
    "(fewer on small data) at exponentially growing rates, stopping when the loss diverges. "
    "A job like any other (events, cancel, deadline, the active-job cap; the spec's `lr` is "
    "what it finds, so it is ignored); when it has `succeeded`, `GET /v1/jobs/{id}/lr-find` "
    "answers the curve and the suggested `lr`, and `/plots/lr-find.svg` draws it. "
    '`model` may be left out. `lr: "auto"` in a training spec runs the same test first.',
)
def create_lr_find_job(
    spec: Annotated[PreviewSpec, Body(examples=[SPEC_EXAMPLE])],
    response: Response,
    context: ContextDep,
    tenant: TenantDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobOut:
    job, created = service.create_job(
        context=context,
        tenant=tenant,
        spec=spec,
        idempotency_key=idempotency_key,
        kind=JobKind.LR_FIND,
    )
    if not created:
        response.status_code = 200
    return JobOut.model_validate(job)


@router.get("", summary="List jobs")
def list_jobs(
    session: SessionDep, tenant: TenantDep, params: Annotated[PageParams, Depends(page_params)]
) -> Page[JobOut]:
    rows, has_more, last_id = paginate(
        session, select(Job).where(Job.tenant_id == tenant.id), Job.id, params
    )
    return Page(data=[JobOut.model_validate(r) for r in rows], has_more=has_more, last_id=last_id)


@router.get("/{job_id}", summary="Show a job: status, progress, plan, error")
def get_job(job: JobDep) -> JobOut:
    return JobOut.model_validate(job)


@router.post("/{job_id}/cancel", summary="Cancel a job (queued: at once; running: between steps)")
def cancel_job(job: JobDep, session: SessionDep) -> JobOut:
    return JobOut.model_validate(service.cancel_job(session, job=job))


@router.get("/{job_id}/events", summary="The job's events: status changes and one per epoch")
def list_events(
    job: JobDep, session: SessionDep, params: Annotated[PageParams, Depends(page_params)]
) -> Page[JobEventOut]:
    rows, has_more, last_id = paginate(
        session, select(JobEvent).where(JobEvent.job_id == job.id), JobEvent.id, params
    )
    return Page(
        data=[JobEventOut.model_validate(r) for r in rows], has_more=has_more, last_id=last_id
    )


@router.get(
    "/{job_id}/events/stream",
    summary="Follow the job's events live (server-sent events)",
    description="`text/event-stream`: each stored event as `id:` (event id), `event:` (`status` "
    "or `epoch`) and `data:` (the event as JSON, as in `/events`); between them `progress` "
    "events (no id) with `status`, `progress` and `eta_seconds`, and `: keep-alive` comments. "
    "The stream ends after the terminal status event (`succeeded`, `failed`, `cancelled`). "
    "Resume with the `Last-Event-ID` header (browsers' EventSource sends it on reconnect) or "
    "`?after=<event id>`.\n\n`curl -N -H 'Authorization: Bearer $KEY' "
    ".../v1/jobs/$JOB/events/stream`",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The event stream.",
            "content": {
                "text/event-stream": {
                    "schema": SSE_EVENT_SCHEMA,
                    "example": STREAM_EXAMPLE,
                }
            },
        }
    },
)
def stream_events(
    job: JobDep,
    session: SessionDep,
    context: ContextDep,
    last_event_id: Annotated[
        str | None, Header(description="Resume after this event id (0 to 2**63-1).")
    ] = None,
    after: Annotated[
        str | None,
        Query(description="Resume after this event id, 0 to 2**63-1 (when no Last-Event-ID)."),
    ] = None,
) -> StreamingResponse:
    cursor = resume_cursor(last_event_id=last_event_id, after=after)
    # The stream opens its own short sessions; this one must not hold a connection meanwhile.
    session.close()
    return StreamingResponse(
        job_event_stream(context, job_id=job.id, after=cursor),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get(
    "/{job_id}/plots/curves.svg",
    summary="Training curves: train/val loss and val accuracy per epoch, stages marked",
    response_class=Response,
    responses={200: {"description": "An SVG image.", "content": {"image/svg+xml": {}}}},
)
def curves(job: JobDep, session: SessionDep) -> Response:
    return Response(
        plots.job_curves_svg(session, job=job),
        media_type="image/svg+xml",
        headers={"Cache-Control": "no-store"},
    )


@router.get(
    "/{job_id}/plots/confusion.png",
    summary="Confusion matrix of the published version on the validation split",
    description="409 `no_model_yet` until the job has published a model version.",
    response_class=Response,
    responses={
        200: {"description": "A PNG image.", "content": {"image/png": {}}},
        409: {"description": "No model version yet.", "model": ErrorEnvelope},
    },
)
def confusion(job: JobDep, session: SessionDep) -> Response:
    return Response(plots.job_confusion_png(session, job=job), media_type="image/png")


@router.get(
    "/{job_id}/lr-find",
    summary="The learning-rate finder's curve and suggestion",
    description="For an `lr_find` job once it has succeeded, and for a training job with "
    '`lr: "auto"` once it has chosen its rate; 409 `no_lr_finding` before that.',
    responses={409: {"description": "No finding (yet).", "model": ErrorEnvelope}},
)
def lr_find_result(job: JobDep, session: SessionDep) -> LrFindOut:
    finding = service.lr_finding(session, job=job)
    return LrFindOut(job_id=job.id, plot=f"/v1/jobs/{job.id}/plots/lr-find.svg", **finding)


@router.get(
    "/{job_id}/plots/lr-find.svg",
    summary="The learning-rate finder's curve: loss against rate, the suggestion marked",
    response_class=Response,
    responses={
        200: {"description": "An SVG image.", "content": {"image/svg+xml": {}}},
        409: {"description": "No finding (yet).", "model": ErrorEnvelope},
    },
)
def lr_find_plot(job: JobDep, session: SessionDep) -> Response:
    return Response(plots.job_lr_find_svg(session, job=job), media_type="image/svg+xml")


@router.get("/{job_id}/metrics", summary="Per-epoch history: losses, accuracy, learning rates")
def job_metrics(job: JobDep, session: SessionDep) -> JobMetricsOut:
    return JobMetricsOut(job_id=job.id, epochs=epoch_history(session, job_id=job.id))


@router.get(
    "/{job_id}/checkpoints",
    summary="The job's saved checkpoint while it trains",
    description="Written after every epoch (model, optimizer, scheduler, RNG state) and used "
    "to resume the job if its worker is lost; removed once the job ends.",
)
def job_checkpoints(job: JobDep, context: ContextDep) -> list[CheckpointOut]:
    key = latest_checkpoint_key(context.store, job.id)
    if key is None:
        return []
    try:
        info = context.store.stat(key)
    except ObjectNotFoundError:  # the job ended meanwhile
        return []
    return [CheckpointOut(name=key.rsplit("/", 1)[-1], size=info.size, saved_at=info.modified)]
