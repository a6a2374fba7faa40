"""The registry: models per tenant, numbered versions, aliases, tags, search, publishing."""

import math
import re
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, delete, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import InstrumentedAttribute, Session, aliased

from service.bounds import INT64_MAX
from service.datasets.schemas import legacy_counts
from service.db import utcnow
from service.errors import ApiError, echo
from service.jobs import transitions
from service.jobs.history import epoch_history
from service.jobs.states import IllegalTransitionError
from service.models.schemas import (
    AliasOut,
    BaseModelRef,
    DatasetRef,
    JobRef,
    Lineage,
    ModelOut,
    VersionDetail,
    VersionOut,
    VersionSummary,
)
from service.pagination import PageParams
from service.storage import ArtifactStore
from service.tables import (
    Dataset,
    Job,
    ModelAlias,
    ModelTag,
    ModelVersion,
    MonitorPrediction,
    RegisteredModel,
    Tenant,
    VersionMetric,
    VersionTag,
)
from worker.engine.stages import Plan


def resolve_version(session: Session, *, model: RegisteredModel, ref: str) -> ModelVersion | None:
    if ref.isdigit():
        if len(ref) > 19 or int(ref) > INT64_MAX:  # no such version, and no such column value
            return None
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


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numeric top-level metrics: what lists can filter and order on."""
    return {
        name: float(value)
        for name, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    }


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
    exports: dict[str, Any] | None = None,
) -> ModelVersion:
    """Record the job's model version and end the job `succeeded`, in one transaction.

    Fenced by attempt: only the attempt that owns the running job may publish (any other gets
    IllegalTransitionError, having written nothing), and the unique `job_id` on versions makes
    a second publish of the same job impossible.
    """

    def register_version(job: Job) -> int:
        model = _get_or_create_model(session, tenant_id=job.tenant_id, name=job.model_name)
        # The increment locks the model row until commit, so concurrent publishes get distinct
        # numbers, and a deleted version's number is never handed out again.
        session.execute(
            update(RegisteredModel)
            .where(RegisteredModel.id == model.id)
            .values(version_counter=RegisteredModel.version_counter + 1)
        )
        number = session.scalar(
            select(RegisteredModel.version_counter).where(RegisteredModel.id == model.id)
        )
        assert number is not None
        session.add(
            ModelVersion(
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
                exports=exports or {},
            )
        )
        session.flush()
        session.add_all(
            VersionMetric(version_id=version_id, name=name, value=value)
            for name, value in scalar_metrics(metrics).items()
        )
        return number

    try:
        transitions.succeed(
            session,
            job_id=job_id,
            attempt=attempt,
            version_id=version_id,
            register_version=register_version,
        )
    except IllegalTransitionError:
        session.rollback()
        raise
    version = session.get_one(ModelVersion, version_id)
    session.commit()
    return version


# --- aliases, tags, archive, delete -------------------------------------------------------


def set_alias(
    session: Session, *, model: RegisteredModel, alias: str, version_number: int
) -> AliasOut:
    """Create the alias or move it to another version."""
    target = resolve_version(session, model=model, ref=str(version_number))
    if target is None:
        raise ApiError(
            404,
            "version_not_found",
            f"Model {model.name!r} has no version {version_number}.",
            param="version",
        )
    row = session.scalar(
        select(ModelAlias).where(ModelAlias.model_id == model.id, ModelAlias.alias == alias)
    )
    if row is None:
        session.add(ModelAlias(model_id=model.id, alias=alias, version_id=target.id))
    else:
        row.version_id = target.id
    session.commit()
    return AliasOut(model=model.name, alias=alias, version=target.version)


def delete_alias(session: Session, *, model: RegisteredModel, alias: str) -> None:
    removed = session.execute(
        delete(ModelAlias).where(ModelAlias.model_id == model.id, ModelAlias.alias == alias)
    )
    if removed.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        raise ApiError(
            404, "alias_not_found", f"Model {model.name!r} has no alias {alias!r}.", param="alias"
        )
    session.commit()


def set_model_tags(session: Session, *, model: RegisteredModel, tags: list[str]) -> None:
    session.execute(delete(ModelTag).where(ModelTag.model_id == model.id))
    session.add_all(ModelTag(model_id=model.id, tag=tag) for tag in sorted(set(tags)))
    session.commit()


def set_capture(
    session: Session, *, model: RegisteredModel, capture: bool | None, least_confident: int | None
) -> None:
    """Predict keeps (or stops keeping) the model's inputs from the next resolution on: the
    row is watched by every process's resolution cache. `least_confident` is read when a
    window closes. None leaves a setting as it is."""
    if capture is not None:
        model.capture = capture
    if least_confident is not None:
        model.capture_least_confident = least_confident
    session.commit()


def update_version(
    session: Session, *, version: ModelVersion, tags: list[str] | None, archived: bool | None
) -> None:
    if tags is not None:
        session.execute(delete(VersionTag).where(VersionTag.version_id == version.id))
        session.add_all(VersionTag(version_id=version.id, tag=tag) for tag in sorted(set(tags)))
    if archived is not None and archived != (version.archived_at is not None):
        version.archived_at = utcnow() if archived else None
    session.commit()


def delete_version(session: Session, *, store: ArtifactStore, version: ModelVersion) -> None:
    """Delete the row, then its artifacts. Refused while an alias points at it: moving or
    deleting the alias first is the caller's explicit decision to stop serving it."""
    pointing = aliases_of(session, version=version)
    if pointing:
        raise ApiError(
            409,
            "version_has_aliases",
            f"Version {version.version} is aliased as {', '.join(pointing)}; move or delete "
            "those aliases first.",
            param="version",
        )
    prefix = version.artifact_prefix
    captured = list(
        session.scalars(
            select(MonitorPrediction.input_key).where(
                MonitorPrediction.version_id == version.id, MonitorPrediction.input_key.is_not(None)
            )
        )
    )
    session.delete(version)
    session.commit()
    # After the commit: a failed delete leaves orphaned files, never a row without its files.
    store.delete(prefix)
    for key in captured:
        if key is not None:
            store.delete(key)


def delete_model(session: Session, *, model: RegisteredModel) -> None:
    """Delete a model that has no versions left (its tags and name go with it)."""
    if session.scalar(select(exists().where(ModelVersion.model_id == model.id))):
        raise ApiError(
            409,
            "model_has_versions",
            f"Model {model.name!r} still has versions; delete them first.",
            param="name",
        )
    session.delete(model)
    session.commit()


# --- search ----------------------------------------------------------------------------------

# Also published in the OpenAPI schema, so generated clients know what the server accepts.
METRIC_FILTER_PATTERN = (
    r"^([A-Za-z_][A-Za-z0-9_]{0,99})(>=|<=|==|=|>|<)([-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
    r"(?:[eE][-+]?[0-9]+)?)$"
)
ORDER_PATTERN = r"^(-?)([A-Za-z_][A-Za-z0-9_]{0,99})$"
_METRIC_FILTER = re.compile(METRIC_FILTER_PATTERN)
_ORDER = re.compile(ORDER_PATTERN)
_OPERATORS = {
    ">=": lambda column, value: column >= value,
    "<=": lambda column, value: column <= value,
    ">": lambda column, value: column > value,
    "<": lambda column, value: column < value,
    "=": lambda column, value: column == value,
    "==": lambda column, value: column == value,
}
# Versions lacking the metric sort after all others, in either direction.
_MISSING_LAST = 1e300


@dataclass(frozen=True)
class MetricFilter:
    name: str
    operator: str
    value: float


@dataclass(frozen=True)
class VersionFilters:
    model: str | None = None
    base_model: str | None = None
    dataset: str | None = None
    strategy: str | None = None
    tags: list[str] = field(default_factory=list)
    metrics: list[MetricFilter] = field(default_factory=list)
    include_archived: bool = False
    order: str = "created_at"


def parse_metric_filter(text: str) -> MetricFilter:
    """`val_accuracy>=0.9` → MetricFilter; anything else is a 422 naming `metric`."""
    match = _METRIC_FILTER.match(text)
    value: float | None = None
    if match:
        try:
            value = float(match.group(3))
        except ValueError:
            value = None
    if match is None or value is None or not math.isfinite(value):
        raise ApiError(
            422,
            "invalid_filter",
            f"metric: {echo(text)} is not `<name><op><number>` with op one of >=, <=, >, <, = "
            "(e.g. `val_accuracy>=0.9`).",
            param="metric",
        )
    return MetricFilter(name=match.group(1), operator=match.group(2), value=value)


def parse_order(text: str) -> str:
    if _ORDER.match(text) is None:
        raise ApiError(
            422,
            "invalid_order",
            f"order: {echo(text)} is not a field or metric name, optionally prefixed with `-` "
            "(e.g. `-val_accuracy`, `created_at`, `version`).",
            param="order",
        )
    return text


def _sort_key(
    order: str, query: Select[Any]
) -> tuple[Select[Any], ColumnElement[Any] | InstrumentedAttribute[Any], bool]:
    descending = order.startswith("-")
    name = order.lstrip("-")
    if name == "created_at":
        return query, ModelVersion.created_at, descending
    if name == "version":
        return query, ModelVersion.version, descending
    metric = aliased(VersionMetric)
    query = query.outerjoin(metric, and_(metric.version_id == ModelVersion.id, metric.name == name))
    missing = -_MISSING_LAST if descending else _MISSING_LAST
    return query, func.coalesce(metric.value, missing), descending


def search_versions(
    session: Session, *, tenant: Tenant, filters: VersionFilters, params: PageParams
) -> tuple[list[ModelVersion], bool, str | None]:
    """Filtered versions in `filters.order` (ties by id), keyset-paginated on the version id."""
    query = (
        select(ModelVersion)
        .join(RegisteredModel, RegisteredModel.id == ModelVersion.model_id)
        .where(RegisteredModel.tenant_id == tenant.id)
    )
    if filters.model is not None:
        query = query.where(RegisteredModel.name == filters.model)
    if filters.base_model is not None:
        query = query.where(ModelVersion.base_model == filters.base_model)
    if filters.dataset is not None:
        query = query.where(ModelVersion.dataset_id == filters.dataset)
    if filters.strategy is not None:
        query = query.where(ModelVersion.strategy == filters.strategy)
    if not filters.include_archived:
        query = query.where(ModelVersion.archived_at.is_(None))
    for tag in filters.tags:
        # A model's tags describe all of its versions.
        query = query.where(
            or_(
                exists().where(VersionTag.version_id == ModelVersion.id, VersionTag.tag == tag),
                exists().where(ModelTag.model_id == ModelVersion.model_id, ModelTag.tag == tag),
            )
        )
    for condition in filters.metrics:
        query = query.where(
            exists().where(
                VersionMetric.version_id == ModelVersion.id,
                VersionMetric.name == condition.name,
                _OPERATORS[condition.operator](VersionMetric.value, condition.value),
            )
        )
    query, key, descending = _sort_key(filters.order, query)
    query = query.add_columns(key.label("sort_key"))
    if params.after is not None:
        cursor = session.execute(query.where(ModelVersion.id == params.after)).first()
        if cursor is None:
            raise ApiError(
                422,
                "invalid_request",
                "after: not a version in this list (use the previous page's last_id).",
                param="after",
            )
        after_key = cursor.sort_key
        beyond = key < after_key if descending else key > after_key
        query = query.where(or_(beyond, and_(key == after_key, ModelVersion.id > params.after)))
    query = query.order_by(key.desc() if descending else key.asc(), ModelVersion.id.asc())
    rows = [row[0] for row in session.execute(query.limit(params.limit + 1))]
    has_more = len(rows) > params.limit
    rows = rows[: params.limit]
    return rows, has_more, (rows[-1].id if rows else None)


def models_query(*, tenant: Tenant, tag: str | None) -> Select[Any]:
    query = select(RegisteredModel).where(RegisteredModel.tenant_id == tenant.id)
    if tag is not None:
        query = query.where(
            exists().where(ModelTag.model_id == RegisteredModel.id, ModelTag.tag == tag)
        )
    return query


# --- views -----------------------------------------------------------------------------------


def aliases_of(session: Session, *, version: ModelVersion) -> list[str]:
    return list(
        session.scalars(
            select(ModelAlias.alias)
            .where(ModelAlias.version_id == version.id)
            .order_by(ModelAlias.alias)
        )
    )


def version_tags(session: Session, *, version: ModelVersion) -> list[str]:
    return list(
        session.scalars(
            select(VersionTag.tag)
            .where(VersionTag.version_id == version.id)
            .order_by(VersionTag.tag)
        )
    )


def version_out(session: Session, *, version: ModelVersion) -> VersionOut:
    return VersionOut(
        id=version.id,
        model=version.model.name,
        version=version.version,
        aliases=aliases_of(session, version=version),
        tags=version_tags(session, version=version),
        archived=version.archived_at is not None,
        archived_at=version.archived_at,
        base_model=version.base_model,
        strategy=version.strategy,
        dataset_id=version.dataset_id,
        job_id=version.job_id,
        labels=version.labels,
        metrics=version.metrics,
        spec=version.spec,
        plan=version.plan,
        exports=version.exports,
        artifacts=version.artifacts,
        created_at=version.created_at,
    )


def _base_model_ref(session: Session, *, version: ModelVersion) -> BaseModelRef:
    parent_id = Plan.from_dict(version.plan).extra.get("parent_version_id")
    parent = session.get(ModelVersion, parent_id) if parent_id else None
    if parent is None:
        return BaseModelRef(name=version.base_model, source="zoo")
    return BaseModelRef(
        name=parent.base_model,
        source="registry",
        model=parent.model.name,
        version=parent.version,
        version_id=parent.id,
    )


def version_detail(session: Session, *, version: ModelVersion) -> VersionDetail:
    dataset = session.get(Dataset, version.dataset_id)
    job = session.get(Job, version.job_id)
    lineage = Lineage(
        base_model=_base_model_ref(session, version=version),
        dataset=DatasetRef(
            id=version.dataset_id,
            name=dataset.name if dataset else None,
            classes=dataset.classes if dataset else [],
            num_labelled=dataset.num_labelled if dataset else 0,
            num_images=(
                legacy_counts(dataset.modality, dataset.num_labelled)["num_images"]
                if dataset
                else 0
            ),
        ),
        job=JobRef(
            id=version.job_id,
            status=job.status if job else None,
            created_at=job.created_at if job else None,
            finished_at=job.finished_at if job else None,
        ),
    )
    return VersionDetail(
        **version_out(session, version=version).model_dump(),
        history=epoch_history(session, job_id=version.job_id),
        lineage=lineage,
    )


def model_out(session: Session, *, model: RegisteredModel) -> ModelOut:
    latest = session.scalar(
        select(ModelVersion)
        .where(ModelVersion.model_id == model.id, ModelVersion.archived_at.is_(None))
        .order_by(ModelVersion.version.desc())
        .limit(1)
    )
    aliases = session.execute(
        select(ModelAlias.alias, ModelVersion.version)
        .join(ModelVersion, ModelAlias.version_id == ModelVersion.id)
        .where(ModelAlias.model_id == model.id)
    )
    tags = session.scalars(
        select(ModelTag.tag).where(ModelTag.model_id == model.id).order_by(ModelTag.tag)
    )
    return ModelOut(
        id=model.id,
        name=model.name,
        tags=list(tags),
        capture=model.capture,
        capture_least_confident=model.capture_least_confident,
        created_at=model.created_at,
        latest_version=None
        if latest is None
        else VersionSummary(
            id=latest.id,
            version=latest.version,
            val_accuracy=latest.metrics.get("val_accuracy"),
            created_at=latest.created_at,
        ),
        aliases={row.alias: row.version for row in aliases},
    )
