"""Request dependencies: the shared context, a session, the caller's tenant, and "load or 404"."""

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.auth.ratelimit import RateLimiter
from service.auth.service import authenticate_cached
from service.bounds import VersionRef
from service.context import AppContext
from service.errors import ApiError, not_found
from service.models.service import resolve_version
from service.tables import Dataset, Experiment, Job, ModelVersion, RegisteredModel, Tenant


def get_context(request: Request) -> AppContext:
    context: AppContext = request.app.state.context
    return context


ContextDep = Annotated[AppContext, Depends(get_context)]


def get_session(context: ContextDep) -> Iterator[Session]:
    with context.db.session() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]

_bearer = HTTPBearer(auto_error=False, description="An API key from `thaw keys create`.")


def get_tenant(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Tenant:
    state = request.app.state
    # Before any cache is read: clear what a change committed anywhere made stale.
    state.context.changes.sync()
    found = (
        authenticate_cached(session, key=credentials.credentials, cache=state.api_keys)
        if credentials
        else None
    )
    if found is None:
        # One answer for missing, unknown, revoked and expired keys: nothing to probe.
        raise ApiError(
            401,
            "unauthorized",
            "Missing or invalid API key: send `Authorization: Bearer <key>` "
            "(create one with `thaw keys create --tenant TEAM`).",
            headers={"WWW-Authenticate": "Bearer"},
        )
    key_id, tenant = found
    take_rate_token(request, key_id)
    return tenant


def take_rate_token(request: Request, key_id: str) -> None:
    """One call's token from the key's rate limit, or 429 with `Retry-After`."""
    limiter: RateLimiter = request.app.state.rate_limiter
    wait = limiter.retry_after(key_id)
    if wait is not None:
        raise ApiError(
            429,
            "rate_limited",
            f"Too many requests with this API key; retry in {wait} s.",
            headers={"Retry-After": str(wait)},
        )


TenantDep = Annotated[Tenant, Depends(get_tenant)]


def load_dataset(
    dataset_id: Annotated[str, Path(description="Dataset id, `ds_...`.")],
    session: SessionDep,
    tenant: TenantDep,
) -> Dataset:
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.tenant_id != tenant.id:
        raise not_found("dataset", dataset_id)
    return dataset


def load_job(
    job_id: Annotated[str, Path(description="Job id, `job_...`.")],
    session: SessionDep,
    tenant: TenantDep,
) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant.id:
        raise not_found("job", job_id)
    return job


def load_model(
    name: Annotated[str, Path(description="Model name, unique in your tenant.")],
    session: SessionDep,
    tenant: TenantDep,
) -> RegisteredModel:
    model = session.scalar(
        select(RegisteredModel).where(
            RegisteredModel.tenant_id == tenant.id, RegisteredModel.name == name
        )
    )
    if model is None:
        raise not_found("model", name)
    return model


ModelDep = Annotated[RegisteredModel, Depends(load_model)]


def load_version(
    model: ModelDep,
    version: VersionRef,
    session: SessionDep,
) -> ModelVersion:
    found = resolve_version(session, model=model, ref=version)
    if found is None:
        raise ApiError(
            404,
            "version_not_found",
            f"Model {model.name!r} has no version or alias {version!r}.",
            param="version",
        )
    return found


DatasetDep = Annotated[Dataset, Depends(load_dataset)]
JobDep = Annotated[Job, Depends(load_job)]
VersionDep = Annotated[ModelVersion, Depends(load_version)]


def load_experiment(
    experiment_id: Annotated[str, Path(description="Experiment id, `exp_...`.")],
    session: SessionDep,
    tenant: TenantDep,
) -> Experiment:
    experiment = session.get(Experiment, experiment_id)
    if experiment is None or experiment.tenant_id != tenant.id:
        raise not_found("experiment", experiment_id)
    return experiment


ExperimentDep = Annotated[Experiment, Depends(load_experiment)]
