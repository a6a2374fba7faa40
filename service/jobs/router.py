from typing import Annotated

from fastapi import APIRouter, Body, Depends, Header, Response
from sqlalchemy import select

from service.deps import ContextDep, JobDep, SessionDep, TenantDep
from service.jobs import service
from service.jobs.schemas import SPEC_EXAMPLE, JobEventOut, JobOut, JobSpec, PlanOut
from service.pagination import Page, PageParams, page_params, paginate
from service.tables import Job, JobEvent

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

SpecBody = Annotated[JobSpec, Body(examples=[SPEC_EXAMPLE])]


@router.post("/plan", summary="Preview the resolved plan of a spec without running it")
def preview_plan(
    spec: SpecBody, session: SessionDep, context: ContextDep, tenant: TenantDep
) -> PlanOut:
    _, _, preview = service.resolve_plan(session, context=context, tenant=tenant, spec=spec)
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
