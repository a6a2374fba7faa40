"""The job's state machine: its states, which states each transition may start from, and the
error an illegal transition raises.

Pure (stdlib only), so the table, the HTTP schemas and the client all import it without a
database or the training stack. `service/jobs/transitions.py` applies these transitions to the
database, each as one conditional update:

- create: a new job is `queued`; claim: `queued` (or `waiting_for_worker`) → `running` (a new
  attempt, under a lease);
- wait for worker (the reaper): `queued` → `waiting_for_worker`, no live worker consumes the
  job's queue; worker found: `waiting_for_worker` → `queued`, one does again (task re-sent);
- renew: `running` keeps its lease; hand back: `running` → `queued` (the worker shuts down);
- cancel: `queued` or `waiting_for_worker` → `cancelled`, `running` → `cancelling`; finish
  cancel: `cancelling` → `cancelled` (the worker stopped);
- lease expired (the reaper): `running` → `queued`, or `failed` once workers were lost too
  often; `cancelling` → `cancelled`; deadline: `cancelling` → `cancelled`, else → `failed`;
- fail: `running`/`cancelling` → `failed` (the worker); fail unsent: `queued` → `failed` (the API
  could not send the task); succeed: `running` → `succeeded` (with its model version, or an
  `lr_find` job's result).
"""

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    WAITING_FOR_WORKER = "waiting_for_worker"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobKind(StrEnum):
    """What a job runs; every kind moves through the same states below."""

    TRAIN = "train"
    """Train by the plan and publish a model version."""
    LR_FIND = "lr_find"
    """The learning-rate range test on the plan's first stage: a curve, no model version."""


RESUMED = "resumed"
"""A `status` event's value when an attempt continues from an earlier attempt's checkpoint:
not a state (the job stays `running`), so no transition leads to it."""

TERMINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
ACTIVE_STATUSES = frozenset(JobStatus) - TERMINAL_STATUSES
"""Not ended yet: these count against a tenant's cap on active jobs."""
LEASED_STATUSES = frozenset({JobStatus.RUNNING, JobStatus.CANCELLING})
"""A worker holds the job (under a lease, as one attempt) and writes its events."""


class Transition(StrEnum):
    CREATE = "create"
    CLAIM = "claim"
    WAIT_FOR_WORKER = "wait_for_worker"
    WORKER_FOUND = "worker_found"
    RENEW = "renew"
    CANCEL = "cancel"
    HAND_BACK = "hand_back"
    FINISH_CANCEL = "finish_cancel"
    EXPIRE_LEASE = "expire_lease"
    EXCEED_DEADLINE = "exceed_deadline"
    FAIL = "fail"
    FAIL_UNSENT = "fail_unsent"
    SUCCEED = "succeed"


SOURCES: dict[Transition, frozenset[JobStatus]] = {
    # A new job has no state before this one.
    Transition.CREATE: frozenset(),
    # A worker may come back and take the job's message before the reaper notices it.
    Transition.CLAIM: frozenset({JobStatus.QUEUED, JobStatus.WAITING_FOR_WORKER}),
    Transition.WAIT_FOR_WORKER: frozenset({JobStatus.QUEUED}),
    Transition.WORKER_FOUND: frozenset({JobStatus.WAITING_FOR_WORKER}),
    # The worker keeps its lease only while it runs: a cancelled job's worker is told to stop.
    Transition.RENEW: frozenset({JobStatus.RUNNING}),
    # Cancelling again records the request again, as it always has, and changes nothing else.
    Transition.CANCEL: ACTIVE_STATUSES,
    Transition.HAND_BACK: frozenset({JobStatus.RUNNING}),
    Transition.FINISH_CANCEL: frozenset({JobStatus.CANCELLING}),
    Transition.EXPIRE_LEASE: LEASED_STATUSES,
    Transition.EXCEED_DEADLINE: ACTIVE_STATUSES,
    Transition.FAIL: LEASED_STATUSES,
    # The API could not send the job's task message, so no worker can hold it.
    Transition.FAIL_UNSENT: frozenset({JobStatus.QUEUED}),
    Transition.SUCCEED: frozenset({JobStatus.RUNNING}),
}
"""The states each transition may start from; every other state makes it illegal."""

FENCED = frozenset(
    {
        Transition.RENEW,
        Transition.HAND_BACK,
        Transition.FINISH_CANCEL,
        Transition.EXPIRE_LEASE,
        Transition.EXCEED_DEADLINE,
        Transition.FAIL,
        Transition.SUCCEED,
    }
)
"""Transitions that also require the attempt their caller saw: a worker's own attempt, or the
attempt the reaper read, so a writer that lost the job changes nothing."""


class IllegalTransitionError(Exception):
    """The job is not in a state this transition may start from (or, for a fenced transition,
    another attempt owns it). Nothing was written."""

    def __init__(
        self,
        *,
        job_id: str,
        transition: Transition,
        from_status: JobStatus | None,
        attempt: int | None = None,
        current_attempt: int | None = None,
    ) -> None:
        caller = "" if attempt is None else f" as attempt {attempt}"
        if from_status is None:
            found = "there is no such job"
        elif attempt is not None and current_attempt != attempt:
            found = f"it is {from_status} as attempt {current_attempt}"
        else:
            found = f"it is {from_status}"
        super().__init__(f"job {job_id}: cannot {transition}{caller}: {found}")
        self.job_id = job_id
        self.transition = transition
        self.from_status = from_status
        self.attempt = attempt
        self.current_attempt = current_attempt


# --- experiments and their trials --------------------------------------------------------------
# An experiment runs trials, each a job once started; their own states are declared here beside
# the job's, and `service/experiments/service.py` moves them only by these tables.


class ExperimentStatus(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    """Every trial ended and at least one succeeded."""
    FAILED = "failed"
    """Every trial ended and none succeeded."""
    CANCELLED = "cancelled"


class ExperimentTransition(StrEnum):
    END = "end"
    """No trial is left to start or running: `succeeded` or `failed`, by its trials."""
    CANCEL = "cancel"


EXPERIMENT_TRANSITIONS: dict[
    ExperimentTransition, tuple[frozenset[ExperimentStatus], frozenset[ExperimentStatus]]
] = {
    ExperimentTransition.END: (
        frozenset({ExperimentStatus.RUNNING}),
        frozenset({ExperimentStatus.SUCCEEDED, ExperimentStatus.FAILED}),
    ),
    ExperimentTransition.CANCEL: (
        frozenset({ExperimentStatus.RUNNING}),
        frozenset({ExperimentStatus.CANCELLED}),
    ),
}
"""Each transition's (source statuses, target statuses); an experiment is created `running`."""
EXPERIMENT_ENDED = frozenset(ExperimentStatus) - {ExperimentStatus.RUNNING}


class TrialState(StrEnum):
    """A trial's own state; once `started`, what it shows is its job's status (or `pruned`)."""

    PENDING = "pending"
    """Waits for room in the experiment's budget; it has no job yet."""
    STARTED = "started"
    NOT_STARTED = "not_started"
    """Never started (the deadline passed, the experiment was cancelled, its job was refused)."""
    PRUNED = "pruned"
    """Started, then stopped by successive halving at a rung."""


class TrialTransition(StrEnum):
    START = "start"
    NOT_START = "not_start"
    PRUNE = "prune"


TRIAL_TRANSITIONS: dict[TrialTransition, tuple[frozenset[TrialState], TrialState]] = {
    TrialTransition.START: (frozenset({TrialState.PENDING}), TrialState.STARTED),
    TrialTransition.NOT_START: (frozenset({TrialState.PENDING}), TrialState.NOT_STARTED),
    TrialTransition.PRUNE: (frozenset({TrialState.STARTED}), TrialState.PRUNED),
}
"""Each transition's (source states, target state); a trial is created `pending`."""


class IllegalStateChangeError(Exception):
    """An experiment or trial asked to move by a transition its state does not allow."""


def experiment_sources(
    transition: ExperimentTransition, to: ExperimentStatus
) -> frozenset[ExperimentStatus]:
    """The statuses an experiment moves to `to` from by `transition` (for the conditional
    UPDATE that moves it); IllegalStateChangeError if `transition` does not lead to `to`."""
    sources, targets = EXPERIMENT_TRANSITIONS[transition]
    if to not in targets:
        raise IllegalStateChangeError(f"an experiment cannot {transition} as {to}")
    return sources


def trial_may(transition: TrialTransition, state: str) -> bool:
    return state in TRIAL_TRANSITIONS[transition][0]


def next_trial_state(transition: TrialTransition, state: str) -> TrialState:
    """The state `transition` takes a trial in `state` to; IllegalStateChangeError if none."""
    if not trial_may(transition, state):
        raise IllegalStateChangeError(f"a trial cannot {transition}: it is {state}")
    return TRIAL_TRANSITIONS[transition][1]
