"""Updates of a model from the labels fed back for its predictions, in one call: the
champion/challenger step, with forgetting measured.

`create_update` takes the model's captured, labelled predictions (`service/monitoring/
capture.py`), holds out a share of them per label for scoring, and makes the rest (plus, if
asked, an uploaded dataset's items) a dataset through the datasets service. `advance` moves an
update on: once that dataset is ready it starts an ordinary training job from the version
(`lwf` by default, so the old task is kept without its data), with the idempotency key
`update:<id>`, so however many passes race it gets one job. It runs when the dataset's ingest
ends (the worker), and on every reaper pass. When the job ends, the worker scores the candidate
and the version on the held-out feedback and on the version's own validation items, and
promotes by the update's rule (`worker/updates.py`).
"""

import logging
import random
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy import update as update_statement
from sqlalchemy.orm import Session

from service.context import AppContext
from service.datasets.service import archive_key, create_dataset, dataset_items, require_ready
from service.db import new_id, utcnow
from service.errors import ApiError, not_found
from service.jobs import service as jobs
from service.jobs.schemas import PARENT_PREFIX, JobSpec
from service.jobs.states import TERMINAL_STATUSES, JobStatus
from service.models.service import resolve_version, set_alias
from service.queues import SCORE_UPDATE_TASK
from service.tables import (
    Dataset,
    Job,
    ModelAlias,
    ModelUpdate,
    ModelVersion,
    MonitorPrediction,
    RegisteredModel,
    Tenant,
)
from service.updates.schemas import UpdateIn, UpdateOut, UpdateScores
from service.uploads import ReceivedUpload
from worker.engine.modalities import modality_for
from worker.engine.stages import Plan

logger = logging.getLogger(__name__)

PREPARING, TRAINING, SCORING, READY, FAILED = "preparing", "training", "scoring", "ready", "failed"
MIN_FEEDBACK = 4
"""Labelled, captured predictions an update needs at least (some to train, some to score)."""
VALIDATION_FRACTION = "0.2"
"""Of the training feedback, the share the job validates on (early stopping, calibration)."""
SCORING_TIMEOUT = timedelta(minutes=30)
"""A scoring (predict over the held-out feedback and the old task's validation items, twice)
still unfinished after this is taken for lost with its worker, and sent again."""


def idempotency_key(update_id: str) -> str:
    return f"update:{update_id}"


def update_of_job(job: Job) -> str | None:
    """The update a job trains for, if any (its idempotency key names it)."""
    key = job.idempotency_key or ""
    return key.removeprefix("update:") if key.startswith("update:") else None


def _updated_version(
    session: Session, *, model: RegisteredModel, request: UpdateIn
) -> ModelVersion:
    ref = request.version
    if ref is None:
        aliased = session.scalar(
            select(ModelAlias.version_id).where(
                ModelAlias.model_id == model.id, ModelAlias.alias == request.alias
            )
        )
        if aliased is not None:
            return session.get_one(ModelVersion, aliased)
        ref = str(
            session.scalar(
                select(func.max(ModelVersion.version)).where(ModelVersion.model_id == model.id)
            )
            or 0
        )
    version = resolve_version(session, model=model, ref=ref)
    if version is None:
        raise not_found("version", ref)
    return version


def _hold_out(
    labelled: list[MonitorPrediction], *, fraction: float, seed: int
) -> tuple[list[MonitorPrediction], list[MonitorPrediction]]:
    """(train, held out): per label, `fraction` of its items (at least one where it has two)."""
    by_label: dict[str, list[MonitorPrediction]] = defaultdict(list)
    for row in labelled:
        by_label[str(row.label)].append(row)
    rng = random.Random(seed)
    train: list[MonitorPrediction] = []
    held_out: list[MonitorPrediction] = []
    for label in sorted(by_label):
        rows = sorted(by_label[label], key=lambda row: row.id)
        rng.shuffle(rows)
        count = max(1, round(fraction * len(rows))) if len(rows) >= 2 else 0
        held_out += rows[:count]
        train += rows[count:]
    return train, held_out


def _extra_items(
    context: AppContext, session: Session, *, tenant: Tenant, dataset_id: str, modality: str
) -> list[tuple[str, Any]]:
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.tenant_id != tenant.id:
        raise not_found("dataset", dataset_id)
    require_ready(dataset, needed_by="updates", param="dataset")
    if (dataset.modality or "image") != modality:
        raise ApiError(
            422,
            "wrong_modality",
            f"dataset: a {dataset.modality} dataset cannot update a {modality} model.",
            "dataset",
        )
    data = dataset_items(context=context, dataset_id=dataset_id)
    return [(data.classes[item.label], item.content) for item in data.items]


def create_update(
    *, context: AppContext, tenant: Tenant, model: RegisteredModel, request: UpdateIn
) -> ModelUpdate:
    """Hold out part of the labelled feedback, make the rest a dataset, record the update."""
    with context.db.session() as session:
        version = _updated_version(session, model=model, request=request)
        modality = Plan.from_dict(version.plan).modality
        labelled = list(
            session.scalars(
                select(MonitorPrediction)
                .join(ModelVersion, ModelVersion.id == MonitorPrediction.version_id)
                .where(
                    ModelVersion.model_id == model.id,
                    MonitorPrediction.label.is_not(None),
                    MonitorPrediction.input_key.is_not(None),
                )
                .order_by(MonitorPrediction.created_at)
            )
        )
        if len(labelled) < MIN_FEEDBACK:
            raise ApiError(
                422,
                "not_enough_feedback",
                f"{model.name} has {len(labelled)} labelled predictions whose inputs were "
                f"captured; an update needs at least {MIN_FEEDBACK}. Switch capture on "
                '(PATCH /v1/models/NAME {"capture": true}) and feed back labels.',
            )
        train, held_out = _hold_out(labelled, fraction=request.holdout_fraction, seed=request.seed)
        if not held_out or not train:
            raise ApiError(
                422,
                "not_enough_feedback",
                "No label has two captured, labelled predictions: nothing could be held out "
                "to score the update.",
            )
        extra = (
            _extra_items(
                context, session, tenant=tenant, dataset_id=request.dataset, modality=modality
            )
            if request.dataset is not None
            else []
        )
        updates_so_far = session.scalar(
            select(func.count()).select_from(ModelUpdate).where(ModelUpdate.model_id == model.id)
        )
        captured: list[tuple[str, Any]] = []
        for row in train:
            assert row.label is not None
            assert row.input_key is not None
            captured.append((row.label, context.store.get_bytes(row.input_key)))
        data, filename = modality_for(modality).upload([*captured, *extra])
        version_id, version_number = version.id, version.version
    dataset_id = new_id("ds")
    key = archive_key(dataset_id)
    context.store.put_bytes(key, data)
    dataset = create_dataset(
        context=context,
        tenant=tenant,
        dataset_id=dataset_id,
        upload=ReceivedUpload(
            key=key,
            filename=filename,
            size=len(data),
            head=data[:4096],
            fields={
                "name": f"{model.name}-feedback",
                "seed": str(request.seed),
                "val_fraction": VALIDATION_FRACTION,
            },
        ),
    )
    update = ModelUpdate(
        tenant_id=tenant.id,
        model_id=model.id,
        from_version_id=version_id,
        status=PREPARING,
        request={
            **request.model_dump(mode="json"),
            "from_version": version_number,
            # An lwf model answers each task under its own name: the new one must be new.
            "task_name": f"{model.name}-update{(updates_so_far or 0) + 1}"[:100],
            "training_items": len(train) + len(extra),
        },
        dataset_id=dataset.id,
        holdout=[row.id for row in held_out],
    )
    with context.db.session() as session:
        session.add(update)
        session.commit()
        session.refresh(update)
        session.expunge(update)
    return update


def _fail(update: ModelUpdate, code: str, message: str) -> None:
    update.status, update.error_code, update.error_message = FAILED, code, message


def _job_spec(update: ModelUpdate, *, model_name: str, dataset_id: str) -> JobSpec:
    request = update.request
    fields = {
        **request["settings"],
        "dataset": dataset_id,
        "model": model_name,
        "base_model": f"{PARENT_PREFIX}{model_name}:{request['from_version']}",
        "strategy": request["strategy"],
    }
    if request["strategy"] == "lwf":
        fields["task_name"] = request["task_name"]
    return JobSpec.model_validate(fields)


def advance(context: AppContext, *, update_id: str) -> None:
    """Start the training job once the dataset is ready; fail the update when its dataset or
    job failed. Scoring is the worker's (after the job); a scoring lost with its worker is
    sent again (`_scoring_lost`)."""
    with context.db.session() as session:
        update = session.get(ModelUpdate, update_id)
        if update is None or update.status not in (PREPARING, TRAINING, SCORING):
            return
        dataset = session.get(Dataset, update.dataset_id) if update.dataset_id else None
        if update.status == PREPARING:
            if dataset is None or dataset.status == "failed":
                _fail(
                    update,
                    "dataset_failed",
                    "The feedback's dataset could not be ingested: "
                    f"{dataset.error_message if dataset else 'it was deleted'}",
                )
                session.commit()
                return
            if dataset.status != "ready":
                return
            tenant = session.get_one(Tenant, update.tenant_id)
            model = session.get_one(RegisteredModel, update.model_id)
            model_name, dataset_id = model.name, dataset.id
            session.expunge(tenant)
        elif update.job_id is not None:
            job = session.get_one(Job, update.job_id)
            if job.status in TERMINAL_STATUSES and job.status != JobStatus.SUCCEEDED:
                _fail(update, job.error_code or "job_failed", job.error_message or job.status)
                session.commit()
            elif _scoring_lost(context, update=update, job=job, now=utcnow()):
                _score_again(context, session, update=update, job=job)
            return
        else:
            return
    try:
        spec = _job_spec(update, model_name=model_name, dataset_id=dataset_id)
        job, _ = jobs.create_job(
            context=context, tenant=tenant, spec=spec, idempotency_key=idempotency_key(update_id)
        )
    except ValidationError as exc:
        code, message = "invalid_spec", str(exc.errors()[0]["msg"])
    except ApiError as exc:
        if exc.status >= 500:
            raise  # the broker: the next pass tries again
        code, message = exc.code, exc.message
    else:
        code, message = "", ""
    with context.db.session() as session:
        row = session.get_one(ModelUpdate, update_id)
        if row.status != PREPARING:
            return
        if code:
            _fail(row, code, message)
        else:
            row.status, row.job_id = TRAINING, job.id
        session.commit()


def _scoring_lost(context: AppContext, *, update: ModelUpdate, job: Job, now: datetime) -> bool:
    """Whether the worker that was to score the update after its job vanished: the job
    succeeded a lease ago and scoring never began (the worker begins at once), or scoring
    (first or sent again) has been under way longer than `SCORING_TIMEOUT`."""
    if job.status != JobStatus.SUCCEEDED or job.finished_at is None:
        return False
    if update.status == TRAINING and not update.scoring_sent:
        lease = timedelta(seconds=context.settings.lease_seconds)
        return job.finished_at < now - lease
    return update.updated_at < now - SCORING_TIMEOUT


def _score_again(context: AppContext, session: Session, *, update: ModelUpdate, job: Job) -> None:
    """Send the scoring to a worker again, or fail the update once its scoring workers
    vanished `THAW_MAX_WORKER_LOSSES` times. One reaper of several wins (the count fences)."""
    sent = update.scoring_sent
    if sent >= context.settings.max_worker_losses:
        _fail(
            update,
            "worker_lost",
            f"The workers scoring the candidate vanished {sent + 1} times.",
        )
        session.commit()
        return
    claimed = session.execute(
        update_statement(ModelUpdate)
        .where(ModelUpdate.id == update.id, ModelUpdate.scoring_sent == sent)
        .values(scoring_sent=sent + 1, updated_at=utcnow())
    )
    session.commit()
    if claimed.rowcount:  # type: ignore[attr-defined]
        logger.warning("update %s: its scoring was lost with its worker; sent again", update.id)
        context.celery.send_task(SCORE_UPDATE_TASK, args=[job.id], queue=job.queue)


def advance_all(context: AppContext) -> None:
    """Every update waiting on its dataset or its job, or whose scoring was lost (the
    reaper's pass)."""
    with context.db.session() as session:
        waiting = list(
            session.scalars(
                select(ModelUpdate.id).where(ModelUpdate.status.in_((PREPARING, TRAINING, SCORING)))
            )
        )
    for update_id in waiting:
        try:
            advance(context, update_id=update_id)
        except Exception:
            logger.exception("could not advance update %s", update_id)


def advance_after_ingest(context: AppContext, *, dataset_id: str) -> None:
    """A dataset's ingest ended: the update waiting on it starts its job. Never raises."""
    try:
        with context.db.session() as session:
            update_id = session.scalar(
                select(ModelUpdate.id).where(ModelUpdate.dataset_id == dataset_id)
            )
        if update_id is not None:
            advance(context, update_id=update_id)
    except Exception:
        logger.exception("could not advance the update of dataset %s; the reaper will", dataset_id)


def promotion_decision(
    *, rule: bool | str, margin: float, scores: dict[str, Any]
) -> tuple[bool, str]:
    """Whether a scored candidate takes the alias, and why. `auto`: only when it is more
    accurate on the held-out feedback and loses less than `margin` on the old task."""
    if rule is True:
        return True, "promoted: asked"
    if rule is False:
        return False, "kept: promote when asked (POST .../promote)"
    if scores["feedback_accuracy"] <= scores["current_feedback_accuracy"]:
        return False, "kept: not more accurate on the held-out feedback"
    old, current_old = scores["old_task_accuracy"], scores["current_old_task_accuracy"]
    if old is None or current_old is None:
        return False, "kept: the old task could not be scored"
    lost = current_old - old
    if lost >= margin:
        return False, f"kept: loses {lost:.3f} on the old task (margin {margin})"
    return True, "promoted: better on feedback, old task within the margin"


def promote(session: Session, *, update: ModelUpdate) -> None:
    """Point the update's alias at its candidate."""
    if update.status != READY or update.scores is None:
        raise ApiError(
            409,
            "update_not_ready",
            f"Update {update.id} is {update.status}: only a scored candidate is promoted.",
        )
    model = session.get_one(RegisteredModel, update.model_id)
    candidate = update.scores["candidate_version"]
    set_alias(session, model=model, alias=update.request["alias"], version_number=candidate)
    update.promoted = True
    update.scores = {**update.scores, "decision": "promoted when asked"}
    session.commit()


def update_out(session: Session, *, update: ModelUpdate) -> UpdateOut:
    model = session.get_one(RegisteredModel, update.model_id)
    request = update.request
    scores = update.scores or {}
    return UpdateOut(
        id=update.id,
        model=model.name,
        status=update.status,
        from_version=request["from_version"],
        candidate_version=scores.get("candidate_version"),
        strategy=request["strategy"],
        dataset_id=update.dataset_id,
        job_id=update.job_id,
        training_items=request["training_items"],
        holdout_items=len(update.holdout),
        promote=request["promote"],
        alias=request["alias"],
        margin=request["margin"],
        scores=UpdateScores.model_validate(scores) if "feedback_accuracy" in scores else None,
        promoted=update.promoted,
        decision=scores.get("decision"),
        error_code=update.error_code,
        error_message=update.error_message,
        created_at=update.created_at,
        updated_at=update.updated_at,
    )


def load_update(session: Session, *, model: RegisteredModel, update_id: str) -> ModelUpdate:
    update = session.get(ModelUpdate, update_id)
    if update is None or update.model_id != model.id:
        raise not_found("update", update_id)
    return update


def model_updates(session: Session, *, model_id: str) -> list[ModelUpdate]:
    """Newest first (at most 100: an update is a training job, a model has few)."""
    return list(
        session.scalars(
            select(ModelUpdate)
            .where(ModelUpdate.model_id == model_id)
            .order_by(ModelUpdate.created_at.desc())
            .limit(100)
        )
    )
