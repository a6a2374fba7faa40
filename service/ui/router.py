"""The dashboard at /ui: server-rendered pages over the same services as the API.

Signing in stores the API key in an HttpOnly, SameSite=Strict cookie. The pages' scripts reach
the API through `/ui/api/v1/...`, which forwards to `/v1/...` with that key as the bearer token,
so the key never reaches JavaScript and the API itself keeps accepting bearer tokens only.
"""

from functools import cache
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Cookie, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import func, select
from starlette.types import Receive, Scope, Send

from service.auth.service import authenticate
from service.datasets.service import text_samples
from service.deps import SessionDep
from service.experiments.service import experiment_out
from service.jobs.schemas import JobSpec
from service.jobs.states import ACTIVE_STATUSES, JobStatus
from service.models.service import model_out, version_out
from service.tables import (
    Dataset,
    Experiment,
    ExperimentEvent,
    Job,
    JobEvent,
    ModelVersion,
    MonitorWindow,
    RegisteredModel,
    Tenant,
)
from worker.engine.modalities import dataset_modality, modality_for
from worker.engine.recipe import stage_recipes
from worker.engine.stages import Plan

router = APIRouter(prefix="/ui", include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
COOKIE = "thaw_key"
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
LIST_LIMIT = 100
TEXT_SAMPLES = 5


def ui_tenant(session: SessionDep, thaw_key: Annotated[str | None, Cookie()] = None) -> Tenant:
    api_key = authenticate(session, key=thaw_key) if thaw_key else None
    if api_key is None:
        # The app's HTTP error handler keeps the headers, so this is a plain redirect.
        raise HTTPException(303, "Sign in first.", headers={"Location": "/ui/login"})
    return api_key.tenant


UiTenant = Annotated[Tenant, Depends(ui_tenant)]


def _page(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, name, context, status_code=status_code)


@router.get("/login")
def login_form(request: Request, error: str | None = None) -> HTMLResponse:
    return _page(request, "login.html", error=error)


@router.post("/login")
async def login(request: Request, session: SessionDep) -> Response:
    form = await request.form()
    key = str(form.get("api_key", "")).strip()
    if not key or authenticate(session, key=key) is None:
        return _page(request, "login.html", error="That API key is not valid.")
    response = RedirectResponse("/ui/jobs", status_code=303)
    response.set_cookie(
        COOKIE,
        key,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/ui",
    )
    return response


@router.post("/logout")
def logout() -> Response:
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path="/ui")
    return response


@router.get("")
def home() -> Response:
    return RedirectResponse("/ui/jobs", status_code=303)


@router.get("/jobs")
def jobs_page(request: Request, session: SessionDep, tenant: UiTenant) -> HTMLResponse:
    jobs = session.scalars(
        select(Job).where(Job.tenant_id == tenant.id).order_by(Job.id.desc()).limit(LIST_LIMIT)
    ).all()
    datasets = session.scalars(
        select(Dataset)
        .where(Dataset.tenant_id == tenant.id, Dataset.status == "ready")
        .order_by(Dataset.id.desc())
    ).all()
    return _page(
        request,
        "jobs.html",
        tenant=tenant,
        jobs=jobs,
        datasets=datasets,
        modalities={d.id: dataset_modality(d.modality) for d in datasets},
        spec=_spec_fields(),
    )


@cache
def _spec_fields() -> dict[str, Any]:
    """The spec's fields as the JSON schema states them, so the form's limits are the API's."""
    properties: dict[str, Any] = JobSpec.model_json_schema()["properties"]
    return properties


@router.get("/jobs/{job_id}")
def job_page(job_id: str, request: Request, session: SessionDep, tenant: UiTenant) -> Response:
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant.id:
        return _page(request, "missing.html", status_code=404, tenant=tenant, what=f"job {job_id}")
    events = session.scalars(
        select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id)
    ).all()
    # Queued, waiting for a worker or running; a job already cancelling needs no second click.
    cancellable = job.status in ACTIVE_STATUSES and job.status != JobStatus.CANCELLING
    return _page(
        request,
        "job.html",
        tenant=tenant,
        job=job,
        events=events,
        cancellable=cancellable,
        plan=(plan := Plan.from_dict(job.plan)),
        recipes=stage_recipes(plan),
    )


@router.get("/experiments")
def experiments_page(request: Request, session: SessionDep, tenant: UiTenant) -> HTMLResponse:
    experiments = session.scalars(
        select(Experiment)
        .where(Experiment.tenant_id == tenant.id)
        .order_by(Experiment.id.desc())
        .limit(LIST_LIMIT)
    ).all()
    return _page(request, "experiments.html", tenant=tenant, experiments=experiments)


@router.get("/experiments/{experiment_id}")
def experiment_page(
    experiment_id: str, request: Request, session: SessionDep, tenant: UiTenant
) -> Response:
    experiment = session.get(Experiment, experiment_id)
    if experiment is None or experiment.tenant_id != tenant.id:
        return _page(
            request,
            "missing.html",
            status_code=404,
            tenant=tenant,
            what=f"experiment {experiment_id}",
        )
    shown = experiment_out(session, context=request.app.state.context, experiment=experiment)
    last_event = session.scalar(
        select(func.max(ExperimentEvent.id)).where(ExperimentEvent.experiment_id == experiment.id)
    )
    return _page(
        request,
        "experiment.html",
        tenant=tenant,
        experiment=shown,
        last_event=last_event or 0,
        # The old-task columns appear only for an experiment started from a registered model.
        old_task=any(row.old_task_accuracy is not None for row in shown.leaderboard),
    )


@router.get("/datasets")
def datasets_page(request: Request, session: SessionDep, tenant: UiTenant) -> HTMLResponse:
    datasets = session.scalars(
        select(Dataset)
        .where(Dataset.tenant_id == tenant.id)
        .order_by(Dataset.id.desc())
        .limit(LIST_LIMIT)
    ).all()
    context = request.app.state.context
    # What the page says of each dataset's items: their count, skipped entries, samples.
    modalities = {d.id: dataset_modality(d.modality) for d in datasets}
    samples = {
        d.id: text_samples(context=context, dataset_id=d.id, limit=TEXT_SAMPLES)
        for d in datasets
        if d.status == "ready" and modalities[d.id].inline_items
    }
    return _page(
        request,
        "datasets.html",
        tenant=tenant,
        datasets=datasets,
        modalities=modalities,
        samples=samples,
    )


def _models(session: SessionDep, tenant: Tenant) -> list[dict[str, Any]]:
    models = session.scalars(
        select(RegisteredModel)
        .where(RegisteredModel.tenant_id == tenant.id)
        .order_by(RegisteredModel.name)
    ).all()
    result = []
    for model in models:
        versions = session.scalars(
            select(ModelVersion)
            .where(ModelVersion.model_id == model.id)
            .order_by(ModelVersion.version.desc())
        ).all()
        # The recipe column, and what the predict page asks for.
        plans = {v.id: Plan.from_dict(v.plan) for v in versions}
        result.append(
            {
                "model": model_out(session, model=model),
                "versions": [version_out(session, version=v) for v in versions],
                "plans": plans,
                # The request field of the version's inputs: images, or texts.
                "inputs": {
                    version: modality_for(plan.modality).input_param
                    for version, plan in plans.items()
                },
                # Versions whose traffic closed a monitoring window: the page plots them.
                "monitored": set(
                    session.scalars(
                        select(MonitorWindow.version_id)
                        .where(MonitorWindow.version_id.in_([v.id for v in versions]))
                        .distinct()
                    )
                ),
            }
        )
    return result


@router.get("/models")
def models_page(request: Request, session: SessionDep, tenant: UiTenant) -> HTMLResponse:
    context = request.app.state.context
    models = _models(session, tenant)
    cards: dict[str, str] = {}
    for entry in models:
        for version in entry["versions"]:
            row = session.get_one(ModelVersion, version.id)
            if any(a.name == "card.md" for a in version.artifacts):
                cards[version.id] = context.store.get_bytes(
                    f"{row.artifact_prefix}/card.md"
                ).decode(errors="replace")
    return _page(request, "models.html", tenant=tenant, models=models, cards=cards)


@router.get("/predict")
def predict_page(request: Request, session: SessionDep, tenant: UiTenant) -> HTMLResponse:
    return _page(request, "predict.html", tenant=tenant, models=_models(session, tenant))


class _Forward(Response):
    """Hands the request, body unread, to the app itself under `/v1/...` with the bearer key.

    Going through the app (not an HTTP client) keeps streaming both ways: uploads are not
    buffered here and server-sent events reach the browser as they are written.
    """

    def __init__(self, scope: Scope) -> None:
        super().__init__()
        self.forward_scope = scope

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.forward_scope["app"](self.forward_scope, receive, send)


def _from_another_site(request: Request) -> bool:
    # Hosts only: behind a TLS-terminating proxy the page's https origin reaches us as http.
    origin = request.headers.get("origin")
    return origin is not None and urlsplit(origin).netloc != request.headers.get("host")


@router.api_route("/api/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
def api_bridge(
    path: str, request: Request, thaw_key: Annotated[str | None, Cookie()] = None
) -> Response:
    if request.method in UNSAFE_METHODS and request.headers.get("x-thaw-ui") != "1":
        # A custom header cannot be sent cross-site without a CORS preflight we never grant:
        # a second wall against forged requests, behind the SameSite cookie.
        return Response("missing X-Thaw-UI header", status_code=403)
    if request.method in UNSAFE_METHODS and _from_another_site(request):
        # A third wall: should a browser ever let another site send the header, its Origin
        # still names that site.
        return Response("cross-origin request refused", status_code=403)
    headers = [
        (name, value)
        for name, value in request.scope["headers"]
        if name not in (b"authorization", b"cookie")
    ]
    if thaw_key:
        headers.append((b"authorization", f"Bearer {thaw_key}".encode()))
    scope = {
        **request.scope,
        "path": f"/v1/{path}",
        "raw_path": f"/v1/{path}".encode(),
        "root_path": "",
        "headers": headers,
    }
    return _Forward(scope)
