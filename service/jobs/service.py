"""Jobs: resolve a spec into a plan, record it, enqueue it by task name; cancel; events.

The engine (torch) is reached through `engine.<name>` at call time, so the API process loads it
on its first plan preview rather than at start-up."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.context import AppContext
from service.datasets.service import require_modality, require_ready
from service.errors import ApiError, echo, not_found
from service.jobs import transitions
from service.jobs.schemas import (
    PARENT_PREFIX,
    TRANSFER_SETTING_NAMES,
    JobSpec,
    PlanOut,
    PreviewSpec,
    SpecFields,
    StagePreview,
)
from service.jobs.states import (
    ACTIVE_STATUSES,
    TERMINAL_STATUSES,
    IllegalTransitionError,
    JobKind,
)
from service.models.service import resolve_version
from service.queues import CPU_QUEUE, GPU_QUEUE, TRAIN_TASK, refuse_unservable
from service.storage import ArtifactStore
from service.tables import Dataset, Job, JobEvent, ModelVersion, RegisteredModel, Tenant
from worker import engine
from worker.engine.artifacts import CONFIG_FILE, parse_model_config
from worker.engine.spec import AUTO, SpecError, decode
from worker.engine.strategies import strategy_named

if TYPE_CHECKING:
    from worker.engine import ParentModel, Plan, TransferConfig

logger = logging.getLogger(__name__)


def transfer_config(
    spec: SpecFields,
    *,
    model_name: str | None,
    num_classes: int,
    train_size: int,
    parent: ParentModel | None = None,
) -> TransferConfig:
    """The engine's config for a spec: its transfer settings, the dataset's classes and
    training-split size (cached stages make more passes over a small one), the parent; the
    task is named after the registry model unless the spec names it."""
    settings = spec.model_dump(include=TRANSFER_SETTING_NAMES)
    settings["task_name"] = settings["task_name"] or model_name
    return decode(
        engine.TransferConfig,
        {**settings, "num_classes": num_classes, "train_size": train_size, "parent": parent},
    )


def resolve_parent(
    session: Session, *, context: AppContext, tenant: Tenant, reference: str
) -> ModelVersion:
    """`model:<name>:<version or alias>` → that registered version of the caller's tenant."""
    name, _, ref = reference.removeprefix(PARENT_PREFIX).partition(":")
    model = session.scalar(
        select(RegisteredModel).where(
            RegisteredModel.tenant_id == tenant.id, RegisteredModel.name == name
        )
    )
    version = None if model is None or not ref else resolve_version(session, model=model, ref=ref)
    if version is None:
        raise ApiError(
            404,
            "base_model_not_found",
            f"No registered model version {echo(reference)} in this tenant; write "
            "`model:<name>:<version or alias>`, e.g. `model:shoes:production`.",
            "base_model",
        )
    return version


def resolve_plan(
    session: Session,
    *,
    context: AppContext,
    tenant: Tenant,
    spec: SpecFields,
    model_name: str | None,
) -> tuple[Dataset, Plan, PlanOut]:
    """Check the spec against the tenant's dataset and the zoo and compile its plan."""
    dataset = session.get(Dataset, spec.dataset)
    if dataset is None or dataset.tenant_id != tenant.id:
        raise not_found("dataset", spec.dataset)
    require_ready(dataset, needed_by="jobs", param="dataset")
    settings = spec.transfer_settings()
    needs_parent = strategy_named(settings.strategy).needs_parent
    if needs_parent is not None and not settings.base_model.startswith(PARENT_PREFIX):
        raise ApiError(
            422,
            "invalid_spec",
            f"base_model: {needs_parent}; set base_model to `model:<name>:<version or alias>`.",
            "base_model",
        )
    parent = (
        resolve_parent(session, context=context, tenant=tenant, reference=settings.base_model)
        if settings.base_model.startswith(PARENT_PREFIX)
        else None
    )
    # `hf:<folder>` base models are checkpoint folders in the weights directory.
    engine.remember_folders(context.settings.resolved_weights_dir)
    train_size = sum(int(c["train"]) for c in dataset.class_counts.values())
    try:
        config = transfer_config(
            spec,
            model_name=model_name,
            num_classes=len(dataset.classes),
            train_size=train_size,
            parent=None if parent is None else _parent_model(context, parent),
        )
        plan = engine.compile_plan(config)
    except engine.UnknownBaseModelError as exc:
        raise ApiError(
            422,
            "unknown_base_model",
            f"{exc} See GET /v1/base-models for the zoo.",
            "base_model",
        ) from None
    except SpecError as exc:
        raise ApiError(422, "invalid_spec", str(exc), exc.field) from None
    except ValueError as exc:
        # A refusal that names no one setting (a spec whose parts disagree).
        raise ApiError(422, "invalid_spec", str(exc)) from None
    require_modality(dataset, base_model=settings.base_model, modality=plan.modality)
    weights_dir = context.settings.resolved_weights_dir
    if parent is not None:
        plan.extra["parent_version_id"] = parent.id
    elif settings.pretrained and not engine.weights_available(settings.base_model, weights_dir):
        raise ApiError(
            422,
            "weights_unavailable",
            f"Pretrained weights for {settings.base_model} are not installed on this server "
            f"(looked in {weights_dir}). Put them there, choose another base model "
            '(GET /v1/base-models), or send "pretrained": false to train from scratch.',
            "base_model",
        )
    described = engine.preview_plan(plan, weights_dir=weights_dir, train_size=train_size)
    stages = [StagePreview.model_validate(stage) for stage in described]
    preview = PlanOut(
        base_model=plan.base_model,
        num_classes=plan.num_classes,
        stages=stages,
        plan=plan.to_dict(),
    )
    return dataset, plan, preview


def _parent_model(context: AppContext, version: ModelVersion) -> ParentModel:
    """A registered version as the engine's parent: its files' storage key (the worker fetches
    them) and its config as data."""
    config_key = f"{version.artifact_prefix}/{CONFIG_FILE}"
    try:
        config = parse_model_config(json.loads(context.store.get_bytes(config_key)))
    except (OSError, ValueError) as error:
        raise ApiError(
            409,
            "files_missing",
            f"The config of version {version.id} cannot be read from storage ({error}); "
            "train from another version or re-publish this one.",
            "base_model",
        ) from None
    return engine.ParentModel(location=version.artifact_prefix, config=config)


def job_files_prefix(job_id: str) -> str:
    """Where a job keeps what it needs only while it runs (its checkpoint)."""
    return f"jobs/{job_id}"


CHECKPOINT_FILE = "checkpoint.pt"


def checkpoint_key(job_id: str, attempt: int) -> str:
    """Each attempt saves under its own prefix, so a stale attempt (it lost its lease, a newer
    one runs) can never overwrite the checkpoint the newer one saved."""
    return f"{job_files_prefix(job_id)}/attempt-{attempt}/{CHECKPOINT_FILE}"


def latest_checkpoint_key(
    store: ArtifactStore, job_id: str, *, before_attempt: int | None = None
) -> str | None:
    """The checkpoint of the latest attempt (before `before_attempt`) that saved one, or None.
    A job in flight when checkpoints moved under attempts kept one at the job's own prefix,
    older than any attempt's."""
    saved = [
        int(name.removeprefix("attempt-"))
        for name in store.children(job_files_prefix(job_id))
        if name.startswith("attempt-") and name.removeprefix("attempt-").isdigit()
    ]
    for attempt in sorted(saved, reverse=True):
        if before_attempt is not None and attempt >= before_attempt:
            continue
        if store.exists(checkpoint_key(job_id, attempt)):
            return checkpoint_key(job_id, attempt)
    legacy = f"{job_files_prefix(job_id)}/{CHECKPOINT_FILE}"
    return legacy if store.exists(legacy) else None


def job_artifacts_prefix(job_id: str) -> str:
    return f"models/{job_id}"


def attempt_artifacts_prefix(job_id: str, attempt: int) -> str:
    """Each attempt exports to its own place, so a stale attempt never touches the live one's."""
    return f"{job_artifacts_prefix(job_id)}/attempt-{attempt}"


def discard_job_files(*, context: AppContext, job_id: str) -> None:
    """Delete what an ended job left in storage that no model version points at: its checkpoint,
    and artifacts of attempts that crashed before committing their version."""
    with context.db.session() as session:
        job = session.get(Job, job_id)
        if job is None or job.status not in TERMINAL_STATUSES:
            return
        published = session.scalar(
            select(ModelVersion.artifact_prefix).where(ModelVersion.job_id == job_id)
        )
    context.store.delete(job_files_prefix(job_id))
    for name in context.store.children(job_artifacts_prefix(job_id)):
        prefix = f"{job_artifacts_prefix(job_id)}/{name}"
        if prefix != published:
            context.store.delete(prefix)


def record_event(session: Session, *, job: Job, kind: str, data: dict[str, Any]) -> None:
    session.add(JobEvent(job_id=job.id, kind=kind, attempt=job.attempt, data=data))


def create_job(
    *,
    context: AppContext,
    tenant: Tenant,
    spec: JobSpec | PreviewSpec,
    idempotency_key: str | None,
    kind: JobKind = JobKind.TRAIN,
) -> tuple[Job, bool]:
    """The new job and True, or the job already made for this idempotency key and False.

    An `lr_find` job runs the learning-rate range test on the spec's first stage; its plan is
    compiled with `lr: auto`, so that the rate it suggests is the spec's `lr` (the groups'
    ratios stay the plan's)."""
    if kind == JobKind.LR_FIND:
        spec = spec.model_copy(update={"lr": AUTO})
    with context.db.session() as session:
        if idempotency_key is not None:
            existing = _job_for_key(session, tenant=tenant, key=idempotency_key)
            if existing is not None:
                return existing, False
        dataset, plan, _ = resolve_plan(
            session, context=context, tenant=tenant, spec=spec, model_name=spec.model
        )
        _check_active_job_cap(session, context=context, tenant=tenant)
        queue = GPU_QUEUE if plan.device == "cuda" else CPU_QUEUE
        refuse_unservable(context.settings, queue=queue)
        job = Job(
            tenant_id=tenant.id,
            dataset_id=dataset.id,
            kind=kind,
            # An lr_find job publishes nothing; its model name, if any, is only a label.
            model_name=spec.model or "",
            # The architecture, also for chained transfer (the spec keeps `model:…`).
            base_model=plan.base_model,
            strategy=plan.extra["strategy"],
            spec=spec.model_dump(mode="json"),
            plan=plan.to_dict(),
            queue=queue,
            idempotency_key=idempotency_key,
            max_runtime_seconds=spec.max_runtime_seconds
            or context.settings.job_max_runtime_seconds,
        )
        transitions.create(session, job=job)
        try:
            session.commit()
        except IntegrityError:
            # Two requests with one key raced: the other insert won, so answer with its job.
            session.rollback()
            assert idempotency_key is not None
            winner = _job_for_key(session, tenant=tenant, key=idempotency_key)
            if winner is None:
                raise
            return winner, False
    try:
        context.celery.send_task(TRAIN_TASK, args=[job.id], queue=job.queue)
    except Exception as exc:
        logger.exception("could not enqueue job %s", job.id)
        _fail_unsent(context, job_id=job.id)
        raise ApiError(
            503, "broker_unavailable", "The task queue is unreachable; try again shortly."
        ) from exc
    return job, True


LR_FIND_EVENT = "lr_find"
"""The event holding a learning-rate range test's curve and suggestion (`LrFinding.to_dict`):
an `lr_find` job's result, or what a training job with `lr: auto` chose its rate by."""


def lr_finding(session: Session, *, job: Job) -> dict[str, Any]:
    """The job's learning-rate range test, or 409 while it has none."""
    found = session.scalar(
        select(JobEvent)
        .where(JobEvent.job_id == job.id, JobEvent.kind == LR_FIND_EVENT)
        .order_by(JobEvent.id.desc())
        .limit(1)
    )
    if found is None:
        detail = (
            f"it is {job.status}"
            if job.kind == JobKind.LR_FIND
            else "it is a training job whose spec did not ask for `lr: auto`, or has not "
            "reached training yet"
        )
        raise ApiError(
            409,
            "no_lr_finding",
            f"Job {job.id} has no learning-rate finding: {detail}.",
            "job_id",
        )
    return dict(found.data)


def _check_active_job_cap(session: Session, *, context: AppContext, tenant: Tenant) -> None:
    cap = context.settings.max_active_jobs_per_tenant
    active = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.tenant_id == tenant.id, Job.status.in_(sorted(ACTIVE_STATUSES)))
    )
    if active is not None and active >= cap:
        raise ApiError(
            429,
            "too_many_active_jobs",
            f"Your team already has {active} queued or running jobs (the limit is {cap}); "
            "wait for one to finish or cancel one.",
            headers={"Retry-After": "60"},
        )


def _job_for_key(session: Session, *, tenant: Tenant, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.tenant_id == tenant.id, Job.idempotency_key == key))


def _fail_unsent(context: AppContext, *, job_id: str) -> None:
    with context.db.session() as session:
        try:
            transitions.fail_unsent(
                session,
                job_id=job_id,
                code="broker_unavailable",
                message="The task queue was unreachable when the job was submitted; "
                "submit it again.",
            )
            session.commit()
        except IllegalTransitionError:
            # Cancelled meanwhile: it ended either way, and the client still hears of the outage.
            pass
    discard_job_files(context=context, job_id=job_id)


def cancel_job(session: Session, *, job: Job) -> Job:
    """Queued jobs end at once; running ones are asked to stop between steps."""
    try:
        cancelled = transitions.request_cancel(session, job_id=job.id)
    except IllegalTransitionError as exc:
        raise ApiError(
            409,
            "job_not_cancellable",
            f"Job {job.id} already ended as {exc.from_status}.",
            "job_id",
        ) from None
    session.commit()
    return cancelled
