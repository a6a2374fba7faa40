"""The experiment's and the trial's state machines, declared in `service/jobs/states.py` beside
the job's: every transition from every state, legal ones to their target, illegal ones refused;
the tables read and write only declared states."""

import pytest

from service.jobs.states import (
    EXPERIMENT_ENDED,
    EXPERIMENT_TRANSITIONS,
    TRIAL_TRANSITIONS,
    ExperimentStatus,
    ExperimentTransition,
    IllegalStateChangeError,
    TrialState,
    TrialTransition,
    experiment_sources,
    next_trial_state,
    trial_may,
)
from service.tables import Experiment, ExperimentTrial

RUNNING = ExperimentStatus.RUNNING
EXPECTED_EXPERIMENT = {
    ExperimentTransition.END: (
        {RUNNING},
        {ExperimentStatus.SUCCEEDED, ExperimentStatus.FAILED},
    ),
    ExperimentTransition.CANCEL: ({RUNNING}, {ExperimentStatus.CANCELLED}),
}
EXPECTED_TRIAL = {
    TrialTransition.START: ({TrialState.PENDING}, TrialState.STARTED),
    TrialTransition.NOT_START: ({TrialState.PENDING}, TrialState.NOT_STARTED),
    TrialTransition.PRUNE: ({TrialState.STARTED}, TrialState.PRUNED),
}
"""The machines as the experiments service moves them, written out independently."""


def test_the_module_declares_the_expected_machines() -> None:
    assert EXPERIMENT_TRANSITIONS == EXPECTED_EXPERIMENT
    assert TRIAL_TRANSITIONS == EXPECTED_TRIAL
    assert {
        ExperimentStatus.SUCCEEDED,
        ExperimentStatus.FAILED,
        ExperimentStatus.CANCELLED,
    } == EXPERIMENT_ENDED


@pytest.mark.parametrize("transition", list(TrialTransition))
@pytest.mark.parametrize("state", list(TrialState))
def test_every_trial_transition_from_every_state(
    transition: TrialTransition, state: TrialState
) -> None:
    sources, target = EXPECTED_TRIAL[transition]
    assert trial_may(transition, state) == (state in sources)
    if state in sources:
        assert next_trial_state(transition, state) == target
    else:
        with pytest.raises(IllegalStateChangeError):
            next_trial_state(transition, state)


@pytest.mark.parametrize("transition", list(ExperimentTransition))
@pytest.mark.parametrize("to", list(ExperimentStatus))
def test_every_experiment_transition_to_every_status(
    transition: ExperimentTransition, to: ExperimentStatus
) -> None:
    sources, targets = EXPECTED_EXPERIMENT[transition]
    if to in targets:
        # The conditional UPDATE moves only an experiment in one of these; an ended one stays.
        assert experiment_sources(transition, to) == sources
        assert not sources & EXPERIMENT_ENDED
    else:
        with pytest.raises(IllegalStateChangeError):
            experiment_sources(transition, to)


@pytest.mark.parametrize(
    ("column", "declared"),
    [
        (Experiment.__table__.c.status, ExperimentStatus),
        (ExperimentTrial.__table__.c.state, TrialState),
    ],
)
def test_the_tables_write_and_read_only_declared_states(column: object, declared: type) -> None:
    kind = column.type  # type: ignore[attr-defined]
    for state in declared:
        assert kind.process_result_value(kind.process_bind_param(state.value, None), None) is state
    with pytest.raises(ValueError, match="resumed"):
        kind.process_bind_param("resumed", None)
