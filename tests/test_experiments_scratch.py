"""An experiment from a registered model that asks for `scratch`: the baseline is the parent's
architecture from random weights, listed under the registered model so that the diagnosis
judges the parent's transfer trials against it."""

from fastapi.testclient import TestClient

from service.context import AppContext
from service.tables import Job
from tests.test_api import small_spec
from tests.test_experiments import experiment_request
from tests.test_strategies_api import digits_dataset, train


def test_scratch_from_a_registered_model_trains_its_architecture_from_random_weights(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    old_data = digits_dataset(client, context, auth, [0, 1])
    train(client, context, auth, small_spec(old_data, model="old", epochs=1))
    new_data = digits_dataset(client, context, auth, [2, 3])
    request = experiment_request(
        new_data,
        base_models=["model:old:1"],
        strategies=["scratch", "fine_tune"],
        budget={"max_parallel": 2},
    )

    created = client.post("/v1/experiments", headers=auth, json=request)

    assert created.status_code == 201, created.text
    trials = {trial["strategy"]: trial for trial in created.json()["trials"]}
    assert {trial["base_model"] for trial in trials.values()} == {"model:old:1"}
    with context.db.session() as session:
        scratch = session.get_one(Job, trials["scratch"]["job_id"])
        tuned = session.get_one(Job, trials["fine_tune"]["job_id"])
        assert scratch.spec["base_model"] == "efficientnet_lite0"
        assert scratch.plan["pretrained"] is False
        assert scratch.plan.get("parent") is None
        assert tuned.spec["base_model"] == "model:old:1"
        assert tuned.plan["parent"] is not None
