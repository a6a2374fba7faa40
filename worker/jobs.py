"""Runs one training job: claim it in the database, train with the engine, publish the result.

Every database write retries while the database is unreachable (for up to a lease), so a
database restart pauses a job rather than failing it. A worker asked to stop (SIGTERM) saves
where it is and hands the job back to the queue, for another worker to continue.
"""

import dataclasses
import json
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.context import AppContext
from service.datasets.service import DatasetItem, dataset_items, ingest_limits
from service.db import new_id, utcnow
from service.jobs import transitions
from service.jobs.history import epoch_history
from service.jobs.service import (
    LR_FIND_EVENT,
    attempt_artifacts_prefix,
    checkpoint_key,
    discard_job_files,
    latest_checkpoint_key,
    record_event,
)
from service.jobs.states import (
    LEASED_STATUSES,
    RESUMED,
    IllegalTransitionError,
    JobKind,
    JobStatus,
)
from service.models.card import render_card
from service.models.service import publish_version
from service.monitoring.reference import write_reference
from service.queues import TRAIN_TASK, worker_identity
from service.storage import ObjectNotFoundError
from service.storage.cache import LocalCache
from service.tables import Dataset, Job
from worker import trials
from worker.engine import (
    EpochResult,
    Plan,
    Sample,
    SharedFeatures,
    TextSample,
    TrainingCancelled,
    TrainingHooks,
    TrainingPaused,
    WeightsUnavailableError,
    export_model,
    run,
)
from worker.engine.artifacts import CARD_FILE, LABELS_FILE, ONNX_FILE
from worker.engine.lr_find import LrFinding, lr_find
from worker.engine.onnx_export import OnnxExport, export_onnx, export_text_onnx
from worker.engine.plan import with_found_lr
from worker.engine.refit import refit
from worker.feature_store import ArtifactFeatureStore, dataset_features_prefix

logger = logging.getLogger(__name__)

LEASE_RENEWAL_SECONDS = 1.0
FEATURE_LOCK_FOLDER = "feature-locks"
"""Beside the object cache's entries in `THAW_CACHE_DIR`: a lock per shared-features entry that
a job on this host is computing."""
STATUS_POLL_SECONDS = 0.05
"""How stale a worker's view of its job's status may be: a cancel stops training at the first
step boundary after it; a few small reads a second cost nothing beside a training step."""

shutdown_requested = threading.Event()
"""Set when this worker process is asked to stop: the running job is handed back."""

T = TypeVar("T")


class DeadlineExceededError(Exception):
    pass


@dataclass(frozen=True)
class Claim:
    attempt: int
    deadline_at: datetime


def _db(context: AppContext, operation: Callable[[Session], T]) -> T:
    return context.db.retrying(operation, for_seconds=context.settings.lease_seconds)


def _lease(context: AppContext) -> timedelta:
    return timedelta(seconds=context.settings.lease_seconds)


def claim(context: AppContext, *, job_id: str, owner: str) -> Claim:
    """Move a queued job to running and return its attempt; IllegalTransitionError if it is not
    queued (this delivery of its task is a duplicate)."""

    def claim_in(session: Session) -> Claim:
        job = transitions.claim(session, job_id=job_id, owner=owner, lease=_lease(context))
        session.commit()
        assert job.deadline_at is not None
        return Claim(attempt=job.attempt, deadline_at=job.deadline_at)

    return _db(context, claim_in)


class JobHooks(TrainingHooks):
    """Writes an event per epoch and the job's progress; renews the lease; stops training when
    the job was cancelled, taken over, is past its deadline, or the worker must shut down."""

    def __init__(self, context: AppContext, *, job_id: str, claim: Claim) -> None:
        self.context = context
        self.job_id = job_id
        self.attempt = claim.attempt
        self.deadline_at = claim.deadline_at
        self.fraction_done = 0.0
        self._last_renewal = self._last_poll = time.monotonic()
        self._saved_checkpoint = False
        self._training = threading.Event()
        """Set by the first `should_stop`: from then on training renews the lease."""
        self._lost = threading.Event()

    def _event(self, kind: str, data: dict[str, Any]) -> None:
        def write(session: Session) -> None:
            # Fenced like every other write: an attempt that lost the job records nothing more.
            job = session.get_one(Job, self.job_id, with_for_update=True)
            if job.attempt == self.attempt and job.status in LEASED_STATUSES:
                record_event(session, job=job, kind=kind, data=data)
            session.commit()

        _db(self.context, write)

    def on_epoch_end(self, result: EpochResult) -> None:
        self._event("epoch", dataclasses.asdict(result))
        trials.after_epoch(self.context, job_id=self.job_id)

    def on_checkpoint(self, path: Path) -> None:
        # The store, not this host, keeps the checkpoint: a job whose host dies resumes on any
        # other. An object appears whole or not at all, so a crash mid-upload leaves the last one.
        # Fenced twice: an attempt that lost the job uploads nothing, and each attempt writes
        # under its own key, so one that loses it during the upload cannot touch a newer one's.
        if not _db(self.context, self._still_ours):
            logger.info("job %s attempt %d lost the job; checkpoint not saved", *self._who())
            return
        self.context.store.put_file(checkpoint_key(self.job_id, self.attempt), path)
        if not self._saved_checkpoint:
            self._saved_checkpoint = True
            # The one it resumed from (if any) is older than this attempt's: no longer needed.
            while (
                older := latest_checkpoint_key(
                    self.context.store, self.job_id, before_attempt=self.attempt
                )
            ) is not None:
                self.context.store.delete(older)

    def _who(self) -> tuple[str, int]:
        return self.job_id, self.attempt

    @contextmanager
    def renewing_lease(self) -> Iterator[None]:
        """Keep the lease from the claim until training renews it between steps (its first
        `should_stop`): the dataset, the checkpoint and a parent model come down from the store
        first and may take longer than a lease. A thread renews it meanwhile; once a renewal
        finds the job no longer this attempt's, `check_still_ours` and `should_stop` say so."""
        renewer = threading.Thread(
            target=self._renew_until_training, name=f"lease-{self.job_id}", daemon=True
        )
        renewer.start()
        try:
            yield
        finally:
            self._training.set()
            renewer.join()

    def _renew_until_training(self) -> None:
        while not self._training.wait(LEASE_RENEWAL_SECONDS):
            try:
                if not _db(self.context, self._renew):
                    self._lost.set()
                    return
            except Exception:
                # The next renewal tries again; a lease is many renewals long.
                logger.exception("job %s attempt %d: lease renewal failed", *self._who())

    def check_still_ours(self) -> None:
        """TrainingCancelled if the job was cancelled or taken over during setup."""
        if self._lost.is_set():
            raise TrainingCancelled()

    def on_resume(self, completed_epochs: int, steps_into_epoch: int) -> None:
        self._event(
            "status",
            {
                "status": RESUMED,
                "completed_epochs": completed_epochs,
                "steps_into_epoch": steps_into_epoch,
            },
        )

    def on_progress(self, done_steps: int, total_steps: int) -> None:
        self.fraction_done = done_steps / max(total_steps, 1)

    def should_pause(self) -> bool:
        return shutdown_requested.is_set()

    def should_stop(self) -> bool:
        self._training.set()
        if self._lost.is_set():
            return True
        if utcnow() >= self.deadline_at:
            raise DeadlineExceededError()
        now = time.monotonic()
        if now - self._last_renewal >= LEASE_RENEWAL_SECONDS:
            self._last_renewal = self._last_poll = now
            return not _db(self.context, self._renew)
        if now - self._last_poll >= STATUS_POLL_SECONDS:
            self._last_poll = now
            return not _db(self.context, self._still_ours)
        return False

    def _renew(self, session: Session) -> bool:
        """Whether the job is still this attempt's to run (cancelled or taken over if not)."""
        try:
            transitions.renew(
                session,
                job_id=self.job_id,
                attempt=self.attempt,
                lease=_lease(self.context),
                progress=round(self.fraction_done, 4),
            )
        except IllegalTransitionError:
            return False
        session.commit()
        return True

    def _still_ours(self, session: Session) -> bool:
        row = session.execute(
            select(Job.status, Job.attempt).where(Job.id == self.job_id)
        ).one_or_none()
        return row is not None and tuple(row) == (JobStatus.RUNNING, self.attempt)


def execute(context: AppContext, *, job_id: str) -> None:
    try:
        claimed = claim(context, job_id=job_id, owner=worker_identity())
    except IllegalTransitionError:
        logger.info("job %s is not queued; this delivery does nothing", job_id)
        return
    attempt = claimed.attempt
    kind, plan, dataset_id = _db(context, lambda session: _plan_of(session, job_id))
    logger.info("job %s attempt %d: %s %s", job_id, attempt, kind, plan.base_model)
    hooks = JobHooks(context, job_id=job_id, claim=claimed)

    def fail(code: str, message: str) -> None:
        def end(session: Session) -> None:
            transitions.fail(session, job_id=job_id, attempt=attempt, code=code, message=message)
            session.commit()

        try:
            _db(context, end)
        except IllegalTransitionError as exc:
            logger.warning("job %s attempt %d did not record its failure: %s", job_id, attempt, exc)
        discard_job_files(context=context, job_id=job_id)

    try:
        if kind == JobKind.LR_FIND:
            _find_lr(context, job_id=job_id, hooks=hooks, plan=plan, dataset_id=dataset_id)
        else:
            _train_and_publish(
                context, job_id=job_id, hooks=hooks, plan=plan, dataset_id=dataset_id
            )
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


@dataclass(frozen=True)
class TrainingData:
    classes: list[str]
    train: list[Any]
    val: list[Any]
    train_ids: list[str]
    val_ids: list[str]
    test: list[DatasetItem]
    """The experiment's test items (none for a job that is no trial)."""
    unlabelled: list[str]
    """Text only: texts without a label."""


def _training_data(context: AppContext, *, job_id: str, dataset_id: str) -> TrainingData:
    """The dataset's classes, train and val samples with their item ids, the experiment's test
    items and (text only) its unlabelled texts."""
    data = dataset_items(context=context, dataset_id=dataset_id)
    kept, test = trials.without_test_split(context, job_id=job_id, items=data.items)

    def sample(item: DatasetItem) -> Any:
        if data.modality == "text":
            return TextSample(text=str(item.content), label=item.label)
        return Sample(path=Path(item.content), label=item.label)

    train = [item for item in kept if item.split == "train"]
    val = [item for item in kept if item.split == "val"]
    return TrainingData(
        classes=data.classes,
        train=[sample(item) for item in train],
        val=[sample(item) for item in val],
        train_ids=[item.id for item in train],
        val_ids=[item.id for item in val],
        test=test,
        unlabelled=data.unlabelled,
    )


def _token_cache(context: AppContext) -> LocalCache:
    """Shared by this host's jobs: a dataset is tokenized once per tokenizer and length, its
    entry kept within the host cache's budget beside downloaded objects."""
    return LocalCache(
        context.settings.resolved_cache_dir, budget_bytes=context.settings.cache_bytes
    )


def _lr_finding(
    context: AppContext, *, hooks: JobHooks, plan: Plan, train: list[Any], val: list[Any]
) -> LrFinding:
    return lr_find(
        plan,
        train=train,
        val=val,
        hooks=hooks,
        weights_dir=context.settings.resolved_weights_dir,
        parent_dir=_parent_folder(context, plan),
        token_cache=_token_cache(context),
    )


def _find_lr(
    context: AppContext, *, job_id: str, hooks: JobHooks, plan: Plan, dataset_id: str
) -> None:
    """An `lr_find` job: the range test; its curve and suggestion end the job as its result."""
    data = _training_data(context, job_id=job_id, dataset_id=dataset_id)
    finding = _lr_finding(context, hooks=hooks, plan=plan, train=data.train, val=data.val)
    if hooks.should_stop():
        raise TrainingCancelled()

    def finish(session: Session) -> None:
        transitions.succeed_with_result(
            session,
            job_id=job_id,
            attempt=hooks.attempt,
            kind=LR_FIND_EVENT,
            result=finding.to_dict(),
        )
        session.commit()

    _db(context, finish)
    logger.info("job %s suggests lr %s", job_id, finding.lr)


def _resolve_auto_lr(
    context: AppContext,
    *,
    job_id: str,
    hooks: JobHooks,
    plan: Plan,
    train: list[Any],
    val: list[Any],
) -> Plan:
    """`lr: auto`: run the range test, and keep the plan at its rate in the job's row (so a
    resumed attempt trains at the same rate without testing again) with the finding as an
    event; the published version records that plan."""
    finding = _lr_finding(context, hooks=hooks, plan=plan, train=train, val=val)
    assert finding.lr is not None, "a plan that needs the finder follows lr"
    found = with_found_lr(plan, finding.lr)

    def record(session: Session) -> None:
        # Fenced like every other write: an attempt that lost the job records nothing (and its
        # training stops at the first step's check).
        job = session.get_one(Job, job_id, with_for_update=True)
        if job.attempt == hooks.attempt and job.status in LEASED_STATUSES:
            job.plan = found.to_dict()
            record_event(session, job=job, kind=LR_FIND_EVENT, data=finding.to_dict())
        session.commit()

    _db(context, record)
    logger.info("job %s: lr auto resolved to %.3g", job_id, finding.lr)
    return found


def _train_and_publish(
    context: AppContext, *, job_id: str, hooks: JobHooks, plan: Plan, dataset_id: str
) -> None:
    with tempfile.TemporaryDirectory(dir=context.scratch_dir, prefix=f"train-{job_id}-") as scratch:
        checkpoint = Path(scratch) / "checkpoint.pt"
        with hooks.renewing_lease():
            data = _training_data(context, job_id=job_id, dataset_id=dataset_id)
            classes, test = data.classes, data.test
            if plan.needs_lr_finder:
                plan = _resolve_auto_lr(
                    context, job_id=job_id, hooks=hooks, plan=plan, train=data.train, val=data.val
                )
            # Every job's frozen-backbone features go to the store, where later jobs on the same
            # items, weights and preprocessing (an experiment's other trials among them) read them.
            shared = SharedFeatures(
                store=ArtifactFeatureStore(
                    context.store,
                    prefix=dataset_features_prefix(dataset_id),
                    lock_dir=context.settings.resolved_cache_dir / FEATURE_LOCK_FOLDER,
                ),
                train_ids=data.train_ids,
                val_ids=data.val_ids,
            )
            # An earlier attempt was handed back or lost: continue where it last saved.
            resume = _download_checkpoint(
                context, job_id=job_id, attempt=hooks.attempt, dest=checkpoint
            )
            parent_dir = _parent_folder(context, plan)
            hooks.check_still_ours()
            result = run(
                plan,
                train=data.train,
                val=data.val,
                classes=classes,
                unlabelled=data.unlabelled,
                hooks=hooks,
                weights_dir=context.settings.resolved_weights_dir,
                checkpoint_path=checkpoint,
                resume_from=checkpoint if resume else None,
                parent_dir=parent_dir,
                token_cache=_token_cache(context),
                shared_features=shared,
            )
            if plan.refit:
                # Once more on train + validation with what the run chose; this is published.
                result = refit(
                    plan,
                    result,
                    train=data.train,
                    val=data.val,
                    classes=classes,
                    unlabelled=data.unlabelled,
                    hooks=hooks,
                    weights_dir=context.settings.resolved_weights_dir,
                    parent_dir=parent_dir,
                    token_cache=_token_cache(context),
                    shared_features=dataclasses.replace(
                        shared, train_ids=[*data.train_ids, *data.val_ids]
                    ),
                )
    if hooks.should_stop():
        raise TrainingCancelled()

    version_id = new_id("mv")
    prefix = attempt_artifacts_prefix(job_id, hooks.attempt)
    export_dir = Path(tempfile.mkdtemp(dir=context.scratch_dir, prefix=f"export-{job_id}-"))
    exports: dict[str, Any] = {}
    try:
        out = export_dir / "artifacts"
        weights_dir = context.settings.resolved_weights_dir
        export_model(result, plan, out, weights_dir=weights_dir)
        (out / LABELS_FILE).write_text(json.dumps(classes, indent=2) + "\n")
        if context.settings.onnx_export:
            exports["onnx"] = _export_onnx(result.model, plan, out / ONNX_FILE).to_dict()
        exports["monitoring"] = write_reference(
            out, model=result.model, train=data.train, val=data.val, limits=ingest_limits(context)
        )
        result.metrics.update(
            trials.evaluate(
                context,
                plan=plan,
                model_dir=out,
                parent_dir=parent_dir,
                test=test,
                classes=classes,
                model=result.model,
            )
        )
        card = _db(
            context,
            lambda session: _model_card(
                session,
                job_id=job_id,
                metrics=result.metrics,
                onnx=exports.get("onnx"),
                monitoring=exports.get("monitoring"),
            ),
        )
        (out / CARD_FILE).write_text(card)
        names = sorted(path.name for path in out.iterdir())
        context.store.put_dir(prefix, out)
    finally:
        shutil.rmtree(export_dir, ignore_errors=True)
    artifacts = [
        {
            "name": name,
            "size": context.store.size(f"{prefix}/{name}"),
            "sha256": context.store.sha256(f"{prefix}/{name}"),
        }
        for name in names
    ]

    def publish(session: Session) -> None:
        publish_version(
            session,
            job_id=job_id,
            attempt=hooks.attempt,
            version_id=version_id,
            metrics=result.metrics,
            labels=classes,
            artifacts=artifacts,
            artifact_prefix=prefix,
            exports=exports,
        )

    try:
        _db(context, publish)
    except IllegalTransitionError:
        # A retried commit may have gone through before its connection dropped.
        if _db(context, lambda session: session.get_one(Job, job_id).model_version_id) != (
            version_id
        ):
            context.store.delete(prefix)
            raise
    except BaseException:
        # Nothing may point at artifacts whose version was never committed.
        context.store.delete(prefix)
        raise
    discard_job_files(context=context, job_id=job_id)
    logger.info("job %s published %s", job_id, version_id)


def _parent_folder(context: AppContext, plan: Plan) -> Path | None:
    """The parent version's files (chained transfer, lwf) as a local folder: the plan names
    them by storage key, and on an object store they are fetched into this host's cache."""
    return None if plan.parent is None else context.store.local_path(plan.parent)


def _download_checkpoint(context: AppContext, *, job_id: str, attempt: int, dest: Path) -> bool:
    """Fetch the latest checkpoint an earlier attempt saved to `dest`; False when none did."""
    key = latest_checkpoint_key(context.store, job_id, before_attempt=attempt)
    if key is None:
        return False
    try:
        context.store.download(key, dest)
    except ObjectNotFoundError:
        return False
    return True


def _export_onnx(model: Any, plan: Plan, out_path: Path) -> OnnxExport:
    if plan.modality == "text":
        assert plan.max_length is not None
        vocab_size = int(model.backbone.config.vocab_size)
        return export_text_onnx(
            model, vocab_size=vocab_size, max_length=plan.max_length, out_path=out_path
        )
    return export_onnx(model, image_size=plan.image_size, out_path=out_path)


def _model_card(
    session: Session,
    *,
    job_id: str,
    metrics: dict[str, Any],
    onnx: dict[str, Any] | None,
    monitoring: dict[str, Any] | None,
) -> str:
    job = session.get_one(Job, job_id)
    dataset = session.get_one(Dataset, job.dataset_id)
    return render_card(
        model_name=job.model_name,
        job_id=job.id,
        dataset={
            "id": dataset.id,
            "name": dataset.name,
            "classes": dataset.classes,
            "class_counts": dataset.class_counts,
            "num_images": dataset.num_images,
        },
        spec=job.spec,
        plan=job.plan,
        metrics=metrics,
        history=epoch_history(session, job_id=job.id),
        onnx=onnx,
        monitoring=monitoring,
    )


def _hand_back(context: AppContext, *, job_id: str, attempt: int, progress: float) -> None:
    """Give the job back to the queue (it checkpointed where it stopped) for another worker."""

    def release(session: Session) -> str:
        job = transitions.hand_back(session, job_id=job_id, attempt=attempt, progress=progress)
        session.commit()
        return job.queue

    try:
        queue = _db(context, release)
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
        _db(context, end)
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
