"""A job's run from its data to a trained model: the dataset's items (less an experiment's test
split), `lr: auto`, shared features, the checkpoint an earlier attempt left, training and
`refit`; and an `lr_find` job's range test."""

import dataclasses
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from service.context import AppContext
from service.datasets.service import DatasetItem, dataset_items
from service.jobs import transitions
from service.jobs.service import LR_FIND_EVENT, latest_checkpoint_key, record_event
from service.jobs.states import LEASED_STATUSES
from service.storage import ObjectNotFoundError
from service.storage.cache import LocalCache
from service.tables import Job
from worker import trials
from worker.engine import (
    Plan,
    SharedFeatures,
    TrainingCancelled,
    TrainingResult,
    run,
)
from worker.engine.lr_find import LrFinding, lr_find
from worker.engine.modalities import modality_for
from worker.engine.plan import with_found_lr
from worker.engine.refit import refit
from worker.feature_store import ArtifactFeatureStore, dataset_features_prefix
from worker.jobs.hooks import JobHooks, db

logger = logging.getLogger(__name__)

FEATURE_LOCK_FOLDER = "feature-locks"
"""Beside the object cache's entries in `THAW_CACHE_DIR`: a lock per shared-features entry that
a job on this host is computing."""


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


@dataclass
class Trained:
    """What training left for the publish: the plan it ran (at its found rate under
    `lr: auto`), its result, its data and the parent's files."""

    plan: Plan
    result: TrainingResult
    data: TrainingData
    parent_dir: Path | None


def training_data(context: AppContext, *, job_id: str, dataset_id: str) -> TrainingData:
    """The dataset's classes, train and val samples with their item ids, the experiment's test
    items and (text only) its unlabelled texts."""
    data = dataset_items(context=context, dataset_id=dataset_id)
    kept, test = trials.without_test_split(context, job_id=job_id, items=data.items)

    modality = modality_for(data.modality)

    def sample(item: DatasetItem) -> Any:
        return modality.sample(str(item.content), item.label)

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


def _host_cache(context: AppContext) -> LocalCache:
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
        parent_dir=parent_folder(context, plan),
        host_cache=_host_cache(context),
    )


def find_lr(
    context: AppContext, *, job_id: str, hooks: JobHooks, plan: Plan, dataset_id: str
) -> None:
    """An `lr_find` job: the range test; its curve and suggestion end the job as its result."""
    data = training_data(context, job_id=job_id, dataset_id=dataset_id)
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

    db(context, finish)
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

    db(context, record)
    logger.info("job %s: lr auto resolved to %.3g", job_id, finding.lr)
    return found


def train(
    context: AppContext, *, job_id: str, hooks: JobHooks, plan: Plan, dataset_id: str
) -> Trained:
    """Train by the plan (continuing an earlier attempt's checkpoint), `refit` if it asks;
    TrainingCancelled if the job stopped being this attempt's meanwhile."""
    with tempfile.TemporaryDirectory(dir=context.scratch_dir, prefix=f"train-{job_id}-") as scratch:
        checkpoint = Path(scratch) / "checkpoint.pt"
        with hooks.renewing_lease():
            data = training_data(context, job_id=job_id, dataset_id=dataset_id)
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
            resume = download_checkpoint(
                context, job_id=job_id, attempt=hooks.attempt, dest=checkpoint
            )
            parent_dir = parent_folder(context, plan)
            hooks.check_still_ours()
            if plan.refit:
                # The refit trains on train + validation, at most as many epochs.
                items = len(data.train)
                hooks.progress_span = (0.0, items / (2 * items + len(data.val)))
            both_runs: dict[str, Any] = {
                "train": data.train,
                "val": data.val,
                "classes": data.classes,
                "unlabelled": data.unlabelled,
                "hooks": hooks,
                "weights_dir": context.settings.resolved_weights_dir,
                "parent_dir": parent_dir,
                "host_cache": _host_cache(context),
            }
            result = run(
                plan,
                checkpoint_path=checkpoint,
                resume_from=checkpoint if resume else None,
                shared_features=shared,
                **both_runs,
            )
            if plan.refit:
                # Once more on train + validation with what the run chose; this is published.
                hooks.progress_span = (hooks.progress_span[1], 1.0)
                result = refit(
                    plan,
                    result,
                    shared_features=dataclasses.replace(
                        shared, train_ids=[*data.train_ids, *data.val_ids]
                    ),
                    **both_runs,
                )
    if hooks.should_stop():
        raise TrainingCancelled()
    return Trained(plan=plan, result=result, data=data, parent_dir=parent_dir)


def parent_folder(context: AppContext, plan: Plan) -> Path | None:
    """The parent version's files (chained transfer, lwf) as a local folder: the plan names
    them by storage key, and on an object store they are fetched into this host's cache."""
    return None if plan.parent is None else context.store.local_path(plan.parent)


def download_checkpoint(context: AppContext, *, job_id: str, attempt: int, dest: Path) -> bool:
    """Fetch the latest checkpoint an earlier attempt saved to `dest`; False when none did."""
    key = latest_checkpoint_key(context.store, job_id, before_attempt=attempt)
    if key is None:
        return False
    try:
        context.store.download(key, dest)
    except ObjectNotFoundError:
        return False
    return True
