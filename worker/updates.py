"""An update's scoring, after its training job ended (`service/updates/service.py` made it):
the candidate and the version it updates, each on

- the held-out feedback: captured inputs whose labels were fed back and never trained on, each
  answered with its default (newest) task, as predict would answer it;
- the version's own task: its dataset's validation items (`trials.score_old_task`: an `lwf`
  candidate with the head it kept, a `fine_tune` one with the version's head on its backbone),
  the forgetting Li & Hoiem measure.

Then the update's rule: `promote: true` points the alias at the candidate; `auto` only when it
is more accurate on the held-out feedback and loses less than `margin` on the old task.
A failure fails the update, never the job.
"""

import io
import logging
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy.orm import Session

from service.context import AppContext
from service.datasets.service import DatasetItem, dataset_items
from service.db import utcnow
from service.jobs.states import TERMINAL_STATUSES, JobStatus
from service.models.service import set_alias
from service.tables import Job, ModelUpdate, ModelVersion, MonitorPrediction, RegisteredModel
from service.updates.service import (
    FAILED,
    READY,
    SCORING,
    promotion_decision,
    update_of_job,
)
from service.webhooks.outbox import UPDATE_READY, emit
from worker import trials
from worker.engine import Plan, Predictor
from worker.engine.modalities import modality_for

logger = logging.getLogger(__name__)


def score_after_job(context: AppContext, *, job_id: str) -> None:
    """Score the update `job_id` trained for, if any, and apply its rule. Never raises."""
    update_id = None
    try:
        with context.db.session() as session:
            job = session.get(Job, job_id)
            update_id = None if job is None else update_of_job(job)
            if job is None or update_id is None or job.status not in TERMINAL_STATUSES:
                return
            update = session.get(ModelUpdate, update_id)
            if update is None or update.status in (READY, FAILED):
                return
            update.job_id = job.id
            if job.status != JobStatus.SUCCEEDED or job.model_version_id is None:
                update.status = FAILED
                update.error_code = job.error_code or "job_failed"
                update.error_message = job.error_message or f"The training job {job.status}."
                session.commit()
                return
            update.status = SCORING
            session.commit()
            candidate_id = job.model_version_id
        scores = _scores(context, update_id=update_id, candidate_id=candidate_id)
        with context.db.session() as session:
            update = session.get_one(ModelUpdate, update_id)
            _decide(session, update=update, scores=scores)
    except Exception as exc:
        logger.exception("job %s: could not score its update", job_id)
        if update_id is not None:
            _record_failure(context, update_id=update_id, exc=exc)


def _record_failure(context: AppContext, *, update_id: str, exc: Exception) -> None:
    try:
        with context.db.session() as session:
            update = session.get_one(ModelUpdate, update_id)
            update.status, update.error_code = FAILED, "scoring_error"
            update.error_message = f"The candidate could not be scored: {type(exc).__name__}."
            session.commit()
    except Exception:
        logger.exception("update %s: could not record its failure", update_id)


def _held_out(
    session: Session, context: AppContext, *, ids: list[str], text: bool, work: Path
) -> tuple[list[DatasetItem], list[str]]:
    """The held-out feedback as items (an image written to `work`), labelled by index into
    the labels returned; inputs deleted since (capture deleted) are left out."""
    rows = session.query(MonitorPrediction).filter(MonitorPrediction.id.in_(ids)).all()
    labels = sorted({str(row.label) for row in rows})
    items = []
    for row in sorted(rows, key=lambda row: row.id):
        if row.input_key is None or row.label is None:
            continue
        data = context.store.get_bytes(row.input_key)
        content: Path | str
        if text:
            content = data.decode()
        else:
            with Image.open(io.BytesIO(data)) as image:
                content = work / f"{row.id}.png"
                image.convert("RGB").save(content)
        items.append(DatasetItem(row.id, labels.index(row.label), "holdout", content))
    return items, labels


def _scores(context: AppContext, *, update_id: str, candidate_id: str) -> dict[str, Any]:
    with context.db.session() as session:
        update = session.get_one(ModelUpdate, update_id)
        current = session.get_one(ModelVersion, update.from_version_id)
        candidate = session.get_one(ModelVersion, candidate_id)
        current_dir = context.store.local_path(current.artifact_prefix)
        candidate_dir = context.store.local_path(candidate.artifact_prefix)
        old_dataset, candidate_number = current.dataset_id, candidate.version
        with tempfile.TemporaryDirectory(dir=context.scratch_dir) as scratch:
            held_out, labels = _held_out(
                session,
                context,
                ids=update.holdout,
                text=modality_for(Plan.from_dict(current.plan).modality).inline_items,
                work=Path(scratch),
            )
            weights_dir = context.settings.resolved_weights_dir
            before = Predictor.load(current_dir, weights_dir=weights_dir)
            after = Predictor.load(candidate_dir, weights_dir=weights_dir)
            scores: dict[str, Any] = {
                "candidate_version": candidate_number,
                "feedback_items": len(held_out),
                "feedback_accuracy": trials.accuracy(after, held_out, labels, None),
                "current_feedback_accuracy": trials.accuracy(before, held_out, labels, None),
            }
    try:
        data = dataset_items(context=context, dataset_id=old_dataset)
        validation = [item for item in data.items if item.split == "val"]
    except Exception:
        logger.warning("update %s: the version's dataset cannot be read", update_id)
        validation = []
    scores["old_task_items"] = len(validation)
    scores["old_task_accuracy"] = scores["current_old_task_accuracy"] = None
    if validation:
        current_accuracy, kept = trials.score_old_task(before, after, validation, data.classes)
        scores["old_task_accuracy"], scores["current_old_task_accuracy"] = kept, current_accuracy
    return scores


def _decide(session: Session, *, update: ModelUpdate, scores: dict[str, Any]) -> None:
    """Record the scores and apply the update's promote rule."""
    request = update.request
    promoted, decision = promotion_decision(
        rule=request["promote"], margin=request["margin"], scores=scores
    )
    model = session.get_one(RegisteredModel, update.model_id)
    if promoted:
        set_alias(
            session,
            model=model,
            alias=request["alias"],
            version_number=scores["candidate_version"],
        )
    update.scores = {**scores, "decision": decision}
    update.promoted = promoted
    update.status = READY
    update.updated_at = utcnow()
    ready = {
        "update_id": update.id,
        "model": model.name,
        "from_version": request["from_version"],
        "promoted": promoted,
        **update.scores,
    }
    emit(session, tenant_id=update.tenant_id, event=UPDATE_READY, data=ready)
    session.commit()
