"""The experiments' OpenAPI examples are real requests and responses: each validates against the
model it documents, and the schema carries them."""

from typing import Any

from service.experiments.schemas import (
    EXPERIMENT_EXAMPLE,
    EXPERIMENT_OUT_EXAMPLE,
    FROM_PARENT_EXAMPLE,
    ExperimentEventOut,
    ExperimentIn,
    ExperimentOut,
    ExperimentSummaryOut,
    PromoteIn,
    PromoteOut,
)
from service.experiments.schemas import (
    TestSplitOut as SplitOut,
)
from service.main import create_app


def examples_of(model: Any) -> list[dict[str, Any]]:
    examples: list[dict[str, Any]] = model.model_json_schema()["examples"]
    assert examples, model
    return examples


def test_every_experiments_example_validates_against_its_model() -> None:
    for request in (EXPERIMENT_EXAMPLE, FROM_PARENT_EXAMPLE):
        ExperimentIn.model_validate(request)
    for model in (
        ExperimentIn,
        ExperimentOut,
        ExperimentSummaryOut,
        ExperimentEventOut,
        PromoteIn,
        PromoteOut,
        SplitOut,
    ):
        for example in examples_of(model):
            model.model_validate(example)
    shown = ExperimentOut.model_validate(EXPERIMENT_OUT_EXAMPLE)
    # The example leaderboard is ranked as the service ranks: by test accuracy.
    accuracies = [row.test_accuracy for row in shown.leaderboard]
    assert accuracies == sorted(accuracies, reverse=True)
    assert {t.id for t in shown.trials} == {row.trial_id for row in shown.leaderboard}


def test_the_schema_shows_request_and_response_examples() -> None:
    schema = create_app().openapi()
    create = schema["paths"]["/v1/experiments"]["post"]
    examples = create["requestBody"]["content"]["application/json"]["examples"]
    assert {e["value"]["model"] for e in examples.values()} == {
        EXPERIMENT_EXAMPLE["model"],
        FROM_PARENT_EXAMPLE["model"],
    }
    components = schema["components"]["schemas"]
    # FastAPI leaves None values out of the schema's copy.
    (shown,) = components["ExperimentOut"]["examples"]
    assert shown["id"] == EXPERIMENT_OUT_EXAMPLE["id"]
    assert shown["diagnosis"] == EXPERIMENT_OUT_EXAMPLE["diagnosis"]
    for name in ("ExperimentSummaryOut", "ExperimentEventOut", "PromoteOut", "TestSplitOut"):
        assert components[name]["examples"], name
