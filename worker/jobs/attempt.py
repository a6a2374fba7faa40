"""One delivery of a job's task: claim the job, run it, and end the attempt. A worker asked to
stop (SIGTERM) saves where it is and hands the job back to the queue, for another worker to
continue; a cancelled or lost job ends as whoever stopped it decided; an error fails it with a
code and a message saying what the user can do."""

import logging

from sqlalchemy.orm import Session

from service.context import AppContext
from service.jobs import transitions
from service.jobs.service import discard_job_files
from service.jobs.states import IllegalTransitionError, JobKind
from service.queues import TRAIN_TASK, worker_identity
from service.tables import Job
from worker import trials
from worker.engine import Plan, TrainingCancelled, TrainingPaused, WeightsUnavailableError
from worker.jobs.hooks import DeadlineExceededError, JobHooks, claim, db
from worker.jobs.publish import publish
from worker.jobs.training import find_lr, train

logger = logging.getLogger(__name__)


def execute(context: AppContext, *, job_id: str) -> None:
    try:
        claimed = claim(context, job_id=job_id, owner=worker_identity())
    except IllegalTransitionError:
        logger.info("job %s is not queued; this delivery does nothing", job_id)
        return
    attempt = claimed.attempt
    kind, plan, dataset_id = db(context, lambda session: _plan_of(session, job_id))
    logger.info("job %s attempt %d: %s %s", job_id, attempt, kind, plan.base_model)
    hooks = JobHooks(context, job_id=job_id, claim=claimed)

    def fail(code: str, message: str) -> None:
        def end(session: Session) -> None:
            transitions.fail(session, job_id=job_id, attempt=attempt, code=code, message=message)
            session.commit()

        try:
            db(context, end)
        except IllegalTransitionError as exc:
            logger.warning("job %s attempt %d did not record its failure: %s", job_id, attempt, exc)
        discard_job_files(context=context, job_id=job_id)

    try:
        if kind == JobKind.LR_FIND:
            find_lr(context, job_id=job_id, hooks=hooks, plan=plan, dataset_id=dataset_id)
        else:
            trained = train(context, job_id=job_id, hooks=hooks, plan=plan, dataset_id=dataset_id)
            publish(context, job_id=job_id, attempt=attempt, trained=trained)
    except TrainingPaused:
        _hand_back(context, job_id=job_id, attempt=attempt, progress=hooks.fraction_done)
    except TrainingCancelled:
        _end_stopped(context, job_id=job_id, attempt=attempt, progress=hooks.fraction_done)
    except IllegalTransitionError as exc:
        logger.warning(
            "job %s attempt %d lost the job; its result was discarded: %s", job_id, attempt, exc
        )
    except DeadlineExceededError:
        fail(
            "deadline_exceeded",
            f"The job did not finish by its deadline ({claimed.deadline_at.isoformat()}): "
            "resubmit with a larger max_runtime_seconds, or fewer epochs or a smaller image_size.",
        )
    except WeightsUnavailableError as exc:
        fail("weights_unavailable", str(exc))
    except Exception as exc:
        logger.exception("job %s failed", job_id)
        fail(*_failure_reason(exc))
    trials.advance_after_job(context, job_id=job_id)


def _plan_of(session: Session, job_id: str) -> tuple[str, Plan, str]:
    job = session.get_one(Job, job_id)
    return job.kind, Plan.from_dict(job.plan), job.dataset_id


def _hand_back(context: AppContext, *, job_id: str, attempt: int, progress: float) -> None:
    """Give the job back to the queue (it checkpointed where it stopped) for another worker."""

    def release(session: Session) -> str:
        job = transitions.hand_back(session, job_id=job_id, attempt=attempt, progress=progress)
        session.commit()
        return job.queue

    try:
        queue = db(context, release)
    except IllegalTransitionError:
        # Cancelled or taken over meanwhile: whoever did that decides what happens next.
        _end_stopped(context, job_id=job_id, attempt=attempt, progress=progress)
        return
    context.celery.send_task(TRAIN_TASK, args=[job_id], queue=queue)
    logger.info("job %s attempt %d handed back for another worker", job_id, attempt)


def _end_stopped(context: AppContext, *, job_id: str, attempt: int, progress: float) -> None:
    """Training stopped because the job was cancelled, or is no longer this attempt's.

    A cancelled job keeps the exact progress it stopped at, so it shows how far it got.
    """

    def end(session: Session) -> None:
        transitions.finish_cancel(session, job_id=job_id, attempt=attempt, progress=progress)
        session.commit()

    try:
        db(context, end)
    except IllegalTransitionError as exc:
        logger.info(
            "job %s attempt %d stopped and leaves the job as it is: %s", job_id, attempt, exc
        )
    discard_job_files(context=context, job_id=job_id)


def _failure_reason(exc: Exception) -> tuple[str, str]:
    """An error code and a message saying what the user can do about it."""
    text = str(exc)
    if isinstance(exc, MemoryError) or "out of memory" in text.lower():
        return (
            "out_of_memory",
            "Training ran out of memory: lower batch_size or image_size and resubmit.",
        )
    if isinstance(exc, FileNotFoundError):
        # Both the dataset and a parent model version (chained transfer, lwf) are read from
        # storage; either may have been deleted after the job was queued.
        return (
            "files_missing",
            f"A file the job reads is gone from storage ({exc.filename}): upload the "
            "dataset again, or choose a base model version that still exists, and resubmit.",
        )
    return "training_error", f"Training failed: {type(exc).__name__}: {text}"
