"""Experiments: create the trials and the test split, start trials as the budget allows, end
the experiment when every trial ended, cancel, the leaderboard, the diagnosis, promote.

Each trial is an ordinary job, created through `service.jobs.service.create_job` with the
idempotency key `experiment-trial:<trial id>`, so however many passes race to start a trial it
gets one job. `advance` is the one place an experiment moves on; it runs when the experiment is
created or cancelled, when a trial's job ends on a worker, and on every reaper pass (which also
catches jobs ended by the reaper or cancelled directly). It writes nothing while a job is being
created, so it never holds a database lock across another session's write.
"""

import dataclasses
import json
import logging
from collections import Counter
from collections.abc import Sequence
from contextlib import suppress
from datetime import timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.context import AppContext
from service.datasets.schemas import TransferabilityIn
from service.datasets.service import dataset_items, rank_base_models, require_ready
from service.db import new_id, utcnow
from service.errors import ApiError, echo, not_found
from service.experiments import pruning
from service.experiments.diagnosis import EpochPoint, TrialRecord, diagnose
from service.experiments.plots import trial_curves_svg
from service.experiments.schemas import (
    ExperimentIn,
    ExperimentOut,
    LeaderboardRow,
    PromoteIn,
    PromoteOut,
    TrialOut,
)
from service.experiments.split import (
    TEST_PREDICTIONS_FILE,
    carve_test_split,
    encode_test_split,
    test_split_key,
)
from service.jobs import service as jobs
from service.jobs import transitions
from service.jobs.history import epoch_history
from service.jobs.schemas import PARENT_PREFIX, JobSpec
from service.jobs.states import (
    EXPERIMENT_ENDED,
    TERMINAL_STATUSES,
    ExperimentStatus,
    ExperimentTransition,
    IllegalTransitionError,
    JobStatus,
    TrialState,
    TrialTransition,
    experiment_sources,
    next_trial_state,
    trial_may,
)
from service.models.service import set_alias
from service.tables import (
    Dataset,
    Experiment,
    ExperimentEvent,
    ExperimentTrial,
    Job,
    ModelVersion,
    RegisteredModel,
    Tenant,
    VersionTag,
)
from worker.engine.artifacts import WEIGHTS_FILE
from worker.engine.stages import Plan
from worker.engine.strategies import strategy_named

logger = logging.getLogger(__name__)

PRESELECT_MAX_IMAGES: int = TransferabilityIn.model_fields["max_images"].default
"""Preselection scores as many training images as the transferability call does by default."""


def trial_idempotency_key(trial_id: str) -> str:
    return f"experiment-trial:{trial_id}"


def record_event(session: Session, *, experiment_id: str, kind: str, data: dict[str, Any]) -> None:
    session.add(ExperimentEvent(experiment_id=experiment_id, kind=kind, data=data))


# --- create ------------------------------------------------------------------------------------


def _trial_spec(request: ExperimentIn, *, base_model: str, strategy: str, seed: int) -> JobSpec:
    fields = {
        **request.settings.model_dump(mode="json"),
        "dataset": request.dataset,
        "model": request.model,
        "base_model": base_model,
        "strategy": strategy,
        "seed": seed,
    }
    try:
        return JobSpec.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ApiError(
            422,
            "invalid_spec",
            f"base model {base_model}, strategy {strategy}: {first['msg']}",
            "settings",
        ) from None


def _scratch_architecture(
    session: Session, *, context: AppContext, tenant: Tenant, base_model: str
) -> str:
    """What a `scratch` trial trains for a base model: the same; for a registered model (a
    parent), its architecture from random weights, the baseline its transfer trials are judged
    against (scratch starts from no model's weights, so it cannot start from the parent's)."""
    if not base_model.startswith(PARENT_PREFIX):
        return base_model
    parent = jobs.resolve_parent(session, context=context, tenant=tenant, reference=base_model)
    return Plan.from_dict(parent.plan).base_model


def _parameters(
    session: Session, *, context: AppContext, tenant: Tenant, spec: JobSpec
) -> tuple[int, int]:
    """The trial's (most trainable in any stage, total) parameters; the job service's own
    checks of the spec (base model, weights, strategy) answer for a trial that cannot run."""
    try:
        _, _, preview = jobs.resolve_plan(
            session, context=context, tenant=tenant, spec=spec, model_name=spec.model
        )
    except ApiError as exc:
        chosen = spec.transfer_settings()
        raise ApiError(
            exc.status,
            exc.code,
            f"base model {chosen.base_model}, strategy {chosen.strategy}: {exc.message}",
            "base_models" if exc.param == "base_model" else exc.param,
        ) from None
    trainable = max(stage.trainable_parameters for stage in preview.stages)
    return trainable, preview.stages[0].total_parameters


def preselection_key(experiment_id: str) -> str:
    return f"experiments/{experiment_id}/preselection.json"


def _preselect(
    context: AppContext, *, request: ExperimentIn, modality: str | None, train: list[Any]
) -> dict[str, Any]:
    """Score the candidates on the training items outside the test split; keep the best
    `request.preselect` by LogME. Returns what `preselection` shows."""
    settings = request.settings.model_dump()
    scored, scores = rank_base_models(
        context=context,
        modality=modality or "image",
        items=train,
        base_models=request.base_models,
        max_images=PRESELECT_MAX_IMAGES,
        image_size=settings.get("image_size"),
        seed=int(settings["seed"]),
        param="base_models",
        max_length=settings.get("max_length"),
    )
    ranking = [dataclasses.asdict(score) for score in scores]
    kept = [score.base_model for score in scores[: request.preselect]]
    return {
        "images": scored,
        "ranking": ranking,
        "kept": [name for name in request.base_models if name in kept],
        "dropped": [name for name in request.base_models if name not in kept],
    }


def create_experiment(*, context: AppContext, tenant: Tenant, request: ExperimentIn) -> Experiment:
    """Check every trial's spec, carve the test split, record the trials, start the first ones."""
    experiment_id = new_id("exp")
    with context.db.session() as session:
        dataset = session.get(Dataset, request.dataset)
        if dataset is None or dataset.tenant_id != tenant.id:
            raise not_found("dataset", request.dataset)
        require_ready(dataset, needed_by="experiments", param="dataset")
        items = dataset_items(context=context, dataset_id=dataset.id).items
        held_out = carve_test_split(
            items,
            fraction=request.test_fraction,
            seed=request.test_seed,
        )
        if not held_out:
            raise ApiError(
                422,
                "dataset_too_small",
                "No class of this dataset has two samples in one split, so nothing can be held "
                "out for testing; upload more samples.",
                "dataset",
            )
        preselection = None
        base_models = request.base_models
        if request.preselect is not None:
            test = set(held_out)
            preselection = _preselect(
                context,
                request=request,
                modality=dataset.modality,
                train=[i for i in items if i.split == "train" and i.id not in test],
            )
            base_models = preselection["kept"]
        seeds = request.seeds or [int(request.settings.model_dump()["seed"])]
        trials: list[ExperimentTrial] = []
        for base_model in base_models:
            for strategy in request.strategies:
                trained = (
                    _scratch_architecture(
                        session, context=context, tenant=tenant, base_model=base_model
                    )
                    if not strategy_named(strategy).pretrained
                    else base_model
                )
                for seed in seeds:
                    spec = _trial_spec(request, base_model=trained, strategy=strategy, seed=seed)
                    trainable, total = _parameters(
                        session, context=context, tenant=tenant, spec=spec
                    )
                    trials.append(
                        ExperimentTrial(
                            experiment_id=experiment_id,
                            position=len(trials),
                            base_model=base_model,
                            strategy=strategy,
                            seed=seed,
                            spec=spec.model_dump(mode="json"),
                            trainable_parameters=trainable,
                            total_parameters=total,
                        )
                    )
        if preselection is not None:
            context.store.put_bytes(
                preselection_key(experiment_id), json.dumps(preselection).encode()
            )
        key = test_split_key(experiment_id)
        context.store.put_bytes(
            key, encode_test_split(held_out, fraction=request.test_fraction, seed=request.test_seed)
        )
        deadline = request.budget.deadline_seconds
        experiment = Experiment(
            id=experiment_id,
            tenant_id=tenant.id,
            dataset_id=dataset.id,
            model_name=request.model,
            status=ExperimentStatus.RUNNING,
            request=request.model_dump(mode="json"),
            max_parallel=request.budget.max_parallel,
            deadline_at=None if deadline is None else utcnow() + timedelta(seconds=deadline),
            test_split_key=key,
            test_size=len(held_out),
        )
        session.add(experiment)
        session.flush()
        session.add_all(trials)
        record_event(
            session,
            experiment_id=experiment_id,
            kind="status",
            data={
                "status": ExperimentStatus.RUNNING,
                "trials": len(trials),
                "test_size": len(held_out),
            },
        )
        session.commit()
    advance(context, experiment_id=experiment_id)
    with context.db.session() as session:
        return session.get_one(Experiment, experiment_id)


# --- advance -----------------------------------------------------------------------------------


def _trial_status(trial: ExperimentTrial, job: Job | None) -> str:
    """Its own state until it has a job (and once pruned), its job's status meanwhile."""
    if trial.state == TrialState.PRUNED or job is None:
        return str(trial.state.value)
    return str(job.status.value)


def _note_ended(session: Session, trial: ExperimentTrial, job: Job) -> None:
    """Record a trial whose job ended, once: its event, and its version's tags."""
    claimed = session.execute(
        update(ExperimentTrial)
        .where(ExperimentTrial.id == trial.id, ExperimentTrial.ended_at.is_(None))
        .values(ended_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        return
    data: dict[str, Any] = {
        "trial_id": trial.id,
        "status": _trial_status(trial, job),
        "job_id": job.id,
    }
    if job.model_version_id is not None:
        version = session.get(ModelVersion, job.model_version_id)
        if version is not None:
            data["version"] = version.version
            data["test_accuracy"] = version.metrics.get("test_accuracy")
            session.add_all(
                VersionTag(version_id=version.id, tag=tag)
                for tag in (f"experiment:{trial.experiment_id}", f"trial:{trial.id}")
            )
    elif job.error_code:
        data["error"] = job.error_code
    record_event(session, experiment_id=trial.experiment_id, kind="trial", data=data)


def _not_started(session: Session, trial: ExperimentTrial, reason: str) -> None:
    trial.state = next_trial_state(TrialTransition.NOT_START, trial.state)
    trial.reason = reason
    trial.ended_at = utcnow()
    record_event(
        session,
        experiment_id=trial.experiment_id,
        kind="trial",
        data={"trial_id": trial.id, "status": trial.state, "reason": reason},
    )


def _prune(session: Session, rows: Sequence[tuple[ExperimentTrial, Job | None]]) -> None:
    """Successive halving: cancel the running trials that fell out of the top at a rung."""
    curves = {
        trial.id: [float(e["val_accuracy"]) for e in epoch_history(session, job_id=job.id)]
        for trial, job in rows
        if job is not None
    }
    for trial, job in rows:
        if (
            job is None
            or job.status != JobStatus.RUNNING
            or not trial_may(TrialTransition.PRUNE, trial.state)
        ):
            continue
        decision = pruning.decide(
            strategy=trial.strategy,
            val_accuracy=curves[trial.id],
            peers={other: curve for other, curve in curves.items() if other != trial.id},
        )
        if decision is None:
            continue
        try:
            transitions.request_cancel(session, job_id=job.id)
        except IllegalTransitionError:
            continue  # it ended meanwhile: its own end stands
        trial.state = next_trial_state(TrialTransition.PRUNE, trial.state)
        trial.reason = decision.reason
        record_event(
            session,
            experiment_id=trial.experiment_id,
            kind="trial",
            data={
                "trial_id": trial.id,
                "status": trial.state,
                "job_id": job.id,
                "epoch": decision.epoch,
                "val_accuracy": decision.val_accuracy,
                "cutoff": decision.cutoff,
                "peers": decision.peers,
            },
        )


def _settle(session: Session, experiment: Experiment) -> list[ExperimentTrial]:
    """Note ended trials, retire pending ones past the deadline, end a finished experiment;
    returns the pending trials there is room to start now."""
    rows = session.execute(
        select(ExperimentTrial, Job)
        .outerjoin(Job, Job.id == ExperimentTrial.job_id)
        .where(ExperimentTrial.experiment_id == experiment.id)
        .order_by(ExperimentTrial.position)
    ).all()
    for trial, job in rows:
        if job is not None and job.status in TERMINAL_STATUSES and trial.ended_at is None:
            _note_ended(session, trial, job)
    if experiment.status in EXPERIMENT_ENDED:
        return []
    if experiment.request.get("budget", {}).get("prune"):
        _prune(session, [(trial, job) for trial, job in rows])
    pending = [trial for trial, job in rows if job is None and trial.state == TrialState.PENDING]
    if experiment.deadline_at is not None and utcnow() >= experiment.deadline_at:
        for trial in pending:
            _not_started(session, trial, "the experiment's deadline passed before it started")
        pending = []
    active = sum(1 for _, job in rows if job is not None and job.status not in TERMINAL_STATUSES)
    if not pending and active == 0:
        succeeded = any(job is not None and job.status == JobStatus.SUCCEEDED for _, job in rows)
        status = ExperimentStatus.SUCCEEDED if succeeded else ExperimentStatus.FAILED
        ended = session.execute(
            update(Experiment)
            .where(
                Experiment.id == experiment.id,
                Experiment.status.in_(experiment_sources(ExperimentTransition.END, status)),
            )
            .values(status=status, finished_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        if ended.rowcount == 1:  # type: ignore[attr-defined]
            record_event(
                session, experiment_id=experiment.id, kind="status", data={"status": status}
            )
        return []
    return pending[: max(experiment.max_parallel - active, 0)]


def _runtime_left(experiment: Experiment, spec: JobSpec, context: AppContext) -> int:
    own = spec.max_runtime_seconds or context.settings.job_max_runtime_seconds
    if experiment.deadline_at is None:
        return own
    left = int((experiment.deadline_at - utcnow()).total_seconds())
    return max(1, min(own, left))


def advance(context: AppContext, *, experiment_id: str) -> None:
    """Bring an experiment up to date with its trials' jobs and start what the budget allows."""
    with context.db.session() as session:
        experiment = session.get(Experiment, experiment_id, with_for_update=True)
        if experiment is None:
            return
        to_start = _settle(session, experiment)
        starts = [(t.id, JobSpec.model_validate(t.spec)) for t in to_start]
        starts = [
            (
                trial_id,
                spec.model_copy(
                    update={"max_runtime_seconds": _runtime_left(experiment, spec, context)}
                ),
            )
            for trial_id, spec in starts
        ]
        tenant = session.get_one(Tenant, experiment.tenant_id)
        session.commit()
        session.expunge(tenant)
    for trial_id, spec in starts:
        key = trial_idempotency_key(trial_id)
        problem: str | None = None
        try:
            jobs.create_job(context=context, tenant=tenant, spec=spec, idempotency_key=key)
        except ApiError as exc:
            if exc.status == 429:
                # The team's cap on active jobs: the next pass starts it when there is room.
                break
            problem = exc.message
        _link(context, experiment_id=experiment_id, trial_id=trial_id, key=key, problem=problem)


def _link(
    context: AppContext, *, experiment_id: str, trial_id: str, key: str, problem: str | None
) -> None:
    """Point the trial at the job its key made (even one that failed to be sent), or record why
    it has none."""
    with context.db.session() as session:
        trial = session.get_one(ExperimentTrial, trial_id, with_for_update=True)
        if trial.job_id is not None or not trial_may(TrialTransition.START, trial.state):
            return
        experiment = session.get_one(Experiment, experiment_id)
        job = session.scalar(
            select(Job).where(Job.tenant_id == experiment.tenant_id, Job.idempotency_key == key)
        )
        if job is None:
            _not_started(session, trial, problem or "its job could not be created")
        else:
            trial.job_id = job.id
            trial.state = next_trial_state(TrialTransition.START, trial.state)
            record_event(
                session,
                experiment_id=experiment_id,
                kind="trial",
                data={"trial_id": trial.id, "status": trial.state, "job_id": job.id},
            )
        session.commit()


def advance_after_job(context: AppContext, *, job_id: str, pruning_only: bool = False) -> None:
    """The job ended, was handed back, or (`pruning_only`) finished an epoch: move its
    experiment on, if it is a trial (with `pruning_only`, only of an experiment that prunes)."""
    with context.db.session() as session:
        found = session.execute(
            select(Experiment.id, Experiment.request)
            .join(ExperimentTrial, ExperimentTrial.experiment_id == Experiment.id)
            .where(ExperimentTrial.job_id == job_id)
        ).one_or_none()
    if found is None:
        return
    experiment_id, request = found
    if not pruning_only or request.get("budget", {}).get("prune"):
        advance(context, experiment_id=experiment_id)


def advance_all(context: AppContext) -> int:
    """Advance every experiment with a trial not yet ended; returns how many."""
    with context.db.session() as session:
        ids = list(
            session.scalars(
                select(ExperimentTrial.experiment_id)
                .where(ExperimentTrial.ended_at.is_(None))
                .distinct()
            )
        )
    for experiment_id in ids:
        try:
            advance(context, experiment_id=experiment_id)
        except Exception:
            logger.exception(
                "could not advance experiment %s; the next pass retries", experiment_id
            )
    return len(ids)


# --- cancel ------------------------------------------------------------------------------------


def cancel_experiment(context: AppContext, *, experiment_id: str) -> None:
    """Cancel every trial: pending ones never start, queued ones end now, running ones stop
    between steps."""
    cancelled = ExperimentStatus.CANCELLED
    with context.db.session() as session:
        moved = session.execute(
            update(Experiment)
            .where(
                Experiment.id == experiment_id,
                Experiment.status.in_(experiment_sources(ExperimentTransition.CANCEL, cancelled)),
            )
            .values(status=cancelled, finished_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        if moved.rowcount != 1:  # type: ignore[attr-defined]
            status = session.get_one(Experiment, experiment_id).status
            raise ApiError(
                409,
                "experiment_not_cancellable",
                f"Experiment {experiment_id} already ended as {status}.",
                "experiment_id",
            )
        record_event(
            session, experiment_id=experiment_id, kind="status", data={"status": cancelled}
        )
        trials = session.scalars(
            select(ExperimentTrial).where(ExperimentTrial.experiment_id == experiment_id)
        ).all()
        for trial in trials:
            if trial.job_id is None and trial_may(TrialTransition.NOT_START, trial.state):
                _not_started(session, trial, "the experiment was cancelled")
            elif trial.job_id is not None:
                # One that ended already stays as it ended.
                with suppress(IllegalTransitionError):
                    transitions.request_cancel(session, job_id=trial.job_id)
        session.commit()
    advance(context, experiment_id=experiment_id)


# --- read: trials, leaderboard, diagnosis ------------------------------------------------------


def _test_predictions(context: AppContext, version: ModelVersion) -> list[dict[str, Any]] | None:
    key = f"{version.artifact_prefix}/{TEST_PREDICTIONS_FILE}"
    if not context.store.exists(key):
        return None
    items: list[dict[str, Any]] = json.loads(context.store.get_bytes(key))["items"]
    return items


def _float(metrics: dict[str, Any], name: str) -> float | None:
    value = metrics.get(name)
    return float(value) if isinstance(value, int | float) else None


def _row(
    session: Session,
    *,
    context: AppContext,
    experiment: Experiment,
    trial: ExperimentTrial,
    job: Job | None,
) -> tuple[LeaderboardRow, TrialRecord | None]:
    """The trial's leaderboard row, and what the diagnosis needs of it once it succeeded."""
    version = (
        session.get(ModelVersion, job.model_version_id)
        if job is not None and job.model_version_id
        else None
    )
    metrics = version.metrics if version is not None else {}
    history = epoch_history(session, job_id=job.id) if job is not None else []
    best = max(range(len(history)), key=lambda e: history[e]["val_accuracy"]) if history else None
    wall = (
        (job.finished_at - job.started_at).total_seconds()
        if job is not None and job.finished_at and job.started_at
        else None
    )
    low, high = _float(metrics, "test_accuracy_low"), _float(metrics, "test_accuracy_high")
    old_task = _float(metrics, "old_task_accuracy")
    parent_accuracy = _float(metrics, "old_task_parent_accuracy")
    weights = next(
        (a["size"] for a in (version.artifacts if version else []) if a["name"] == WEIGHTS_FILE),
        None,
    )
    row = LeaderboardRow(
        rank=0,
        trial_id=trial.id,
        base_model=trial.base_model,
        strategy=trial.strategy,
        seed=trial.seed,
        status=_trial_status(trial, job),
        job_id=trial.job_id,
        val_accuracy=_float(metrics, "val_accuracy"),
        val_loss=_float(metrics, "val_loss"),
        test_accuracy=_float(metrics, "test_accuracy"),
        test_accuracy_interval=None if low is None or high is None else [low, high],
        test_loss=_float(metrics, "test_loss"),
        test_macro_f1=_float(metrics, "test_macro_f1"),
        epochs_run=len(history) if job is not None else None,
        epochs_to_best=None if best is None else int(history[best]["global_epoch"]),
        wall_seconds=wall,
        trainable_parameters=trial.trainable_parameters,
        total_parameters=trial.total_parameters,
        artifact_bytes=weights,
        latency_ms_per_item=_float(metrics, "latency_ms_per_item"),
        old_task_accuracy=old_task,
        old_task_change=None
        if old_task is None or parent_accuracy is None
        else old_task - parent_accuracy,
        model=experiment.model_name,
        version=version.version if version is not None else None,
        version_id=version.id if version is not None else None,
        error=f"{job.error_code}: {job.error_message}"
        if job is not None and job.error_code
        else None,
    )
    record = None
    if version is not None and history:
        items = _test_predictions(context, version)
        record = TrialRecord(
            trial_id=trial.id,
            base_model=trial.base_model,
            strategy=trial.strategy,
            curve=[
                EpochPoint(
                    train_loss=float(e["train_loss"]),
                    val_loss=float(e["val_loss"]),
                    val_accuracy=float(e["val_accuracy"]),
                )
                for e in history
            ],
            test_correct=None
            if items is None
            else [float(item["predicted"] == item["label"]) for item in items],
            wall_seconds=wall,
        )
    return row, record


def _rank_key(row: LeaderboardRow) -> tuple[bool, float, float, int]:
    return (
        row.test_accuracy is None,
        -(row.test_accuracy or 0.0),
        row.wall_seconds if row.wall_seconds is not None else float("inf"),
        row.trainable_parameters,
    )


def _preselection(context: AppContext, experiment: Experiment) -> dict[str, Any] | None:
    if experiment.request.get("preselect") is None:
        return None
    data: dict[str, Any] = json.loads(context.store.get_bytes(preselection_key(experiment.id)))
    return data


def experiment_out(
    session: Session, *, context: AppContext, experiment: Experiment
) -> ExperimentOut:
    rows = session.execute(
        select(ExperimentTrial, Job)
        .outerjoin(Job, Job.id == ExperimentTrial.job_id)
        .where(ExperimentTrial.experiment_id == experiment.id)
        .order_by(ExperimentTrial.position)
    ).all()
    board: list[LeaderboardRow] = []
    records: list[TrialRecord] = []
    for trial, job in rows:
        row, record = _row(session, context=context, experiment=experiment, trial=trial, job=job)
        board.append(row)
        if record is not None:
            records.append(record)
    board.sort(key=_rank_key)
    for rank, row in enumerate(board, start=1):
        row.rank = rank
    return ExperimentOut(
        id=experiment.id,
        status=experiment.status,
        dataset_id=experiment.dataset_id,
        model_name=experiment.model_name,
        request=experiment.request,
        test_size=experiment.test_size,
        max_parallel=experiment.max_parallel,
        deadline_at=experiment.deadline_at,
        trials=[
            TrialOut(
                id=trial.id,
                position=trial.position,
                base_model=trial.base_model,
                strategy=trial.strategy,
                seed=trial.seed,
                status=_trial_status(trial, job),
                reason=trial.reason,
                job_id=trial.job_id,
            )
            for trial, job in rows
        ],
        leaderboard=board,
        preselection=_preselection(context, experiment),
        diagnosis=diagnose(records, seed=int(experiment.request.get("test_seed", 0))),
        created_at=experiment.created_at,
        finished_at=experiment.finished_at,
    )


def trial_counts(session: Session, *, experiment: Experiment) -> dict[str, int]:
    rows = session.execute(
        select(ExperimentTrial, Job)
        .outerjoin(Job, Job.id == ExperimentTrial.job_id)
        .where(ExperimentTrial.experiment_id == experiment.id)
    ).all()
    return dict(Counter(_trial_status(trial, job) for trial, job in rows))


def curves_svg(session: Session, *, experiment: Experiment) -> bytes:
    trials = session.scalars(
        select(ExperimentTrial)
        .where(ExperimentTrial.experiment_id == experiment.id)
        .order_by(ExperimentTrial.position)
    ).all()
    repeated = len({t.seed for t in trials}) > 1
    return trial_curves_svg(
        [
            (
                f"{t.base_model}/{t.strategy}" + (f" seed {t.seed}" if repeated else ""),
                t.strategy,
                epoch_history(session, job_id=t.job_id) if t.job_id else [],
            )
            for t in trials
        ],
        title=f"{experiment.model_name} · {experiment.id}: val accuracy per trial",
    )


# --- promote -----------------------------------------------------------------------------------


def promote(
    session: Session, *, context: AppContext, experiment: Experiment, request: PromoteIn
) -> PromoteOut:
    """Point the alias at a trial's version (default: the leader's)."""
    board = experiment_out(session, context=context, experiment=experiment).leaderboard
    if request.trial is None:
        chosen = next((row for row in board if row.version is not None), None)
        if chosen is None:
            raise ApiError(
                409,
                "no_model_yet",
                f"No trial of experiment {experiment.id} has published a version yet.",
                "trial",
            )
    else:
        found = next((row for row in board if row.trial_id == request.trial), None)
        if found is None:
            raise ApiError(
                404,
                "trial_not_found",
                f"Experiment {experiment.id} has no trial {echo(request.trial)}.",
                "trial",
            )
        if found.version is None:
            raise ApiError(
                409,
                "no_model_yet",
                f"Trial {found.trial_id} is {found.status} and has published no version.",
                "trial",
            )
        chosen = found
    assert chosen.version is not None
    model = session.scalar(
        select(RegisteredModel).where(
            RegisteredModel.tenant_id == experiment.tenant_id,
            RegisteredModel.name == experiment.model_name,
        )
    )
    assert model is not None, "a published version has its model"
    alias = set_alias(session, model=model, alias=request.alias, version_number=chosen.version)
    return PromoteOut(
        experiment_id=experiment.id,
        trial_id=chosen.trial_id,
        model=alias.model,
        alias=alias.alias,
        version=alias.version,
        test_accuracy=chosen.test_accuracy,
    )
