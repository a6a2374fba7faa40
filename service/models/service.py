"""The registry: models per tenant, numbered versions, aliases, and publishing a job's result."""

from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db import utcnow
from service.models.schemas import ModelOut, VersionOut, VersionSummary
from service.tables import Job, JobEvent, ModelAlias, ModelVersion, RegisteredModel


class StaleAttemptError(Exception):
    """The job moved on (another attempt owns it, or it was cancelled): this writer must stop."""


def resolve_version(session: Session, *, model: RegisteredModel, ref: str) -> ModelVersion | None:
    if ref.isdigit():
        return session.scalar(
            select(ModelVersion).where(
                ModelVersion.model_id == model.id, ModelVersion.version == int(ref)
            )
        )
    return session.scalar(
        select(ModelVersion)
        .join(ModelAlias, ModelAlias.version_id == ModelVersion.id)
        .where(ModelAlias.model_id == model.id, ModelAlias.alias == ref)
    )


def _get_or_create_model(session: Session, *, tenant_id: str, name: str) -> RegisteredModel:
    query = select(RegisteredModel).where(
        RegisteredModel.tenant_id == tenant_id, RegisteredModel.name == name
    )
    model = session.scalar(query)
    if model is not None:
        return model
    try:
        with session.begin_nested():
            model = RegisteredModel(tenant_id=tenant_id, name=name)
            session.add(model)
    except IntegrityError:
        model = session.scalar(query)
        assert model is not None
    return model


def publish_version(
    session: Session,
    *,
    job_id: str,
    attempt: int,
    version_id: str,
    metrics: dict[str, Any],
    labels: list[str],
    artifacts: list[dict[str, Any]],
    artifact_prefix: str,
) -> ModelVersion:
    """Record the job's model version and end the job `succeeded`, in one transaction.

    Fenced by attempt: only the attempt that owns the running job may publish, and the unique
    `job_id` on versions makes a second publish of the same job impossible.
    """
    claimed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.attempt == attempt, Job.status == "running")
        .values(status="succeeded", progress=1.0, finished_at=utcnow(), model_version_id=version_id)
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        raise StaleAttemptError(f"job {job_id} attempt {attempt} may no longer publish")
    job = session.get_one(Job, job_id)
    model = _get_or_create_model(session, tenant_id=job.tenant_id, name=job.model_name)
    for _ in range(5):
        number = (
            session.scalar(
                select(func.max(ModelVersion.version)).where(ModelVersion.model_id == model.id)
            )
            or 0
        ) + 1
        try:
            with session.begin_nested():
                version = ModelVersion(
                    id=version_id,
                    model_id=model.id,
                    version=number,
                    job_id=job.id,
                    dataset_id=job.dataset_id,
                    base_model=job.base_model,
                    strategy=job.strategy,
                    spec=job.spec,
                    plan=job.plan,
                    metrics=metrics,
                    labels=labels,
                    artifacts=artifacts,
                    artifact_prefix=artifact_prefix,
                )
                session.add(version)
            break
        except IntegrityError:
            continue  # another job took this number at the same moment; take the next one
    else:
        raise RuntimeError(f"could not allocate a version number for model {model.name}")
    session.add(
        JobEvent(
            job_id=job.id,
            kind="status",
            attempt=attempt,
            data={"status": "succeeded", "model": model.name, "version": number},
        )
    )
    session.commit()
    return version


def aliases_of(session: Session, *, version: ModelVersion) -> list[str]:
    return list(
        session.scalars(
            select(ModelAlias.alias)
            .where(ModelAlias.version_id == version.id)
            .order_by(ModelAlias.alias)
        )
    )


def version_out(session: Session, *, version: ModelVersion) -> VersionOut:
    return VersionOut(
        id=version.id,
        model=version.model.name,
        version=version.version,
        aliases=aliases_of(session, version=version),
        base_model=version.base_model,
        strategy=version.strategy,
        dataset_id=version.dataset_id,
        job_id=version.job_id,
        labels=version.labels,
        metrics=version.metrics,
        spec=version.spec,
        plan=version.plan,
        artifacts=version.artifacts,
        created_at=version.created_at,
    )


def model_out(session: Session, *, model: RegisteredModel) -> ModelOut:
    latest = session.scalar(
        select(ModelVersion)
        .where(ModelVersion.model_id == model.id)
        .order_by(ModelVersion.version.desc())
        .limit(1)
    )
    aliases = session.execute(
        select(ModelAlias.alias, ModelVersion.version)
        .join(ModelVersion, ModelAlias.version_id == ModelVersion.id)
        .where(ModelAlias.model_id == model.id)
    )
    return ModelOut(
        id=model.id,
        name=model.name,
        created_at=model.created_at,
        latest_version=None
        if latest is None
        else VersionSummary(
            id=latest.id,
            version=latest.version,
            val_accuracy=latest.metrics.get("val_accuracy"),
            created_at=latest.created_at,
        ),
        aliases=dict(aliases),
    )
