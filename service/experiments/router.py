from typing import Annotated

from fastapi import APIRouter, Body, Depends, Header, Query, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from service.deps import ContextDep, ExperimentDep, SessionDep, TenantDep
from service.experiments import service
from service.experiments.schemas import (
    EXPERIMENT_EXAMPLE,
    FROM_PARENT_EXAMPLE,
    PROMOTE_EXAMPLE,
    ExperimentEventOut,
    ExperimentIn,
    ExperimentOut,
    ExperimentSummaryOut,
    PromoteIn,
    PromoteOut,
    TestSplitOut,
)
from service.experiments.split import decode_test_split
from service.experiments.stream import experiment_event_stream
from service.jobs.stream import SSE_EVENT_SCHEMA, resume_cursor
from service.pagination import Page, PageParams, page_params, paginate
from service.tables import Experiment, ExperimentEvent

router = APIRouter(prefix="/v1/experiments", tags=["experiments"])


@router.post(
    "",
    status_code=201,
    summary="Compare base models and transfer strategies on one dataset",
    description="Checks every trial's spec (422 names the failing base model and strategy), "
    "carves a seeded, stratified test split out of the dataset, records one trial per base "
    "model x strategy x seed and starts as many as `budget.max_parallel` allows. Each trial "
    "is an ordinary job (GET /v1/jobs/{id}, events, cancel) that publishes a version of "
    "`model` tagged `experiment:<id>` and `trial:<id>`; the rest start as earlier ones end.",
)
def create_experiment(
    request: Annotated[
        ExperimentIn,
        Body(
            openapi_examples={
                "strategies": {
                    "summary": "Strategies on one backbone, against scratch",
                    "value": EXPERIMENT_EXAMPLE,
                },
                "from_a_registered_model": {
                    "summary": "From a registered model: old-task accuracy kept or lost",
                    "value": FROM_PARENT_EXAMPLE,
                },
            }
        ),
    ],
    session: SessionDep,
    context: ContextDep,
    tenant: TenantDep,
) -> ExperimentOut:
    session.close()  # creation opens its own sessions
    created = service.create_experiment(context=context, tenant=tenant, request=request)
    experiment = session.get_one(Experiment, created.id)
    return service.experiment_out(session, context=context, experiment=experiment)


@router.get("", summary="List experiments")
def list_experiments(
    session: SessionDep, tenant: TenantDep, params: Annotated[PageParams, Depends(page_params)]
) -> Page[ExperimentSummaryOut]:
    rows, has_more, last_id = paginate(
        session,
        select(Experiment).where(Experiment.tenant_id == tenant.id),
        Experiment.id,
        params,
    )
    return Page(
        data=[ExperimentSummaryOut.model_validate(r) for r in rows],
        has_more=has_more,
        last_id=last_id,
    )


@router.get(
    "/{experiment_id}",
    summary="An experiment: its trials, the leaderboard and the diagnosis",
)
def get_experiment(
    experiment: ExperimentDep, session: SessionDep, context: ContextDep
) -> ExperimentOut:
    return service.experiment_out(session, context=context, experiment=experiment)


@router.post(
    "/{experiment_id}/cancel",
    summary="Cancel every trial (pending: never start; queued: at once; running: between steps)",
)
def cancel_experiment(
    experiment: ExperimentDep, session: SessionDep, context: ContextDep
) -> ExperimentOut:
    service.cancel_experiment(context, experiment_id=experiment.id)
    session.refresh(experiment)
    return service.experiment_out(session, context=context, experiment=experiment)


@router.get(
    "/{experiment_id}/test-split",
    summary="The held-out test split: the dataset items no trial trains or selects on",
)
def test_split(experiment: ExperimentDep, context: ContextDep) -> TestSplitOut:
    items = decode_test_split(context.store.get_bytes(experiment.test_split_key))
    return TestSplitOut(experiment_id=experiment.id, items=items)


@router.get(
    "/{experiment_id}/plots/curves.svg",
    summary="Every trial's val accuracy per epoch on one plot, scratch dashed",
    response_class=Response,
    responses={200: {"description": "An SVG image.", "content": {"image/svg+xml": {}}}},
)
def curves(experiment: ExperimentDep, session: SessionDep) -> Response:
    return Response(
        service.curves_svg(session, experiment=experiment),
        media_type="image/svg+xml",
        headers={"Cache-Control": "no-store"},
    )


@router.post(
    "/{experiment_id}/promote",
    summary="Point an alias (default `production`) at a trial's version (default: the leader's)",
)
def promote(
    experiment: ExperimentDep,
    session: SessionDep,
    context: ContextDep,
    request: Annotated[
        PromoteIn,
        Body(openapi_examples={"leader": {"value": {}}, "trial": {"value": PROMOTE_EXAMPLE}}),
    ] = PromoteIn(),
) -> PromoteOut:
    return service.promote(session, context=context, experiment=experiment, request=request)


@router.get(
    "/{experiment_id}/events",
    summary="The experiment's events: its status changes and each trial's start and end",
)
def list_events(
    experiment: ExperimentDep,
    session: SessionDep,
    params: Annotated[PageParams, Depends(page_params)],
) -> Page[ExperimentEventOut]:
    rows, has_more, last_id = paginate(
        session,
        select(ExperimentEvent).where(ExperimentEvent.experiment_id == experiment.id),
        ExperimentEvent.id,
        params,
    )
    return Page(
        data=[ExperimentEventOut.model_validate(r) for r in rows],
        has_more=has_more,
        last_id=last_id,
    )


@router.get(
    "/{experiment_id}/events/stream",
    summary="Follow the experiment's events live (server-sent events)",
    description="`text/event-stream`, as a job's stream: each stored event (`status`, `trial`) "
    "with its id, `progress` events with the count of trials per status when it changes, "
    "keep-alive comments; it ends after the experiment's terminal status event. Resume with "
    "`Last-Event-ID` or `?after=`.",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The event stream.",
            "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
        }
    },
)
def stream_events(
    experiment: ExperimentDep,
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
    session.close()
    return StreamingResponse(
        experiment_event_stream(context, experiment_id=experiment.id, after=cursor),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
