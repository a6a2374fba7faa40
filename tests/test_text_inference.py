"""Predict with strings over HTTP, on a text version the worker published from an engine run:
answers in order with `text_index` and `truncated`, per-item errors for empty and oversized
texts, the ONNX Runtime backend, and a 422 naming the input kind a model takes.

The dataset rows (`service/datasets`, `load_manifest`) of a text upload belong to the text
dataset work; here the worker's job runs on an image dataset of six classes while its engine
run gets the Debian descriptions of six sections, so everything after the dataset's loading
(the engine, export, ONNX, the card, publish, serving) is the worker's own path.
"""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

import worker.jobs as jobs
from service.cli import migrate_database
from service.main import create_app
from tests.conftest import make_settings, new_key, version_folder
from tests.engine.test_text_train import debian_texts
from tests.test_api import assert_error, ready_dataset
from tests.test_inference import b64, held_out_pngs
from tests.test_registry import Registry, publish
from worker.engine import TextSample

LONG = "a free software implementation of the classic card game " * 20


@pytest.fixture(scope="module")
def text_version(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Registry, dict[str, Any]]]:
    settings = make_settings(
        tmp_path_factory.mktemp("text-inference") / "data",
        max_predict_texts=4,
        max_predict_text_chars=2000,
    )
    migrate_database(settings)
    train, _ = debian_texts(8)
    val, _ = debian_texts(3, skip=8)
    with TestClient(create_app(settings)) as client, pytest.MonkeyPatch.context() as patch:
        context = client.app.state.context  # type: ignore[attr-defined]
        auth = new_key(context, "team-a")
        registry = Registry(
            client, context, auth, ready_dataset(client, context, auth, classes=6, per_class=2)
        )
        publish(registry, epochs=1)  # an image model, `digits`, for texts sent to it
        engine_run = jobs.run

        def run_on_texts(plan: Any, *, train: Any, val: Any, **rest: Any) -> Any:
            return engine_run(plan, train=texts_train, val=texts_val, **rest)

        texts_train: list[TextSample] = train
        texts_val: list[TextSample] = val
        patch.setattr(jobs, "run", run_on_texts)
        spec = {
            "dataset": registry.dataset_id,
            "model": "sections",
            "base_model": "minilm_l6",
            "strategy": "feature_extraction",
            "epochs": 3,
            "lr": 0.01,
            "max_length": 24,
            "seed": 1,
        }
        job = client.post("/v1/jobs", headers=auth, json=spec)
        assert job.status_code == 201, job.text
        assert job.json()["plan"]["max_length"] == 24
        jobs.execute(context, job_id=job.json()["id"])
        done = client.get(f"/v1/jobs/{job.json()['id']}", headers=auth).json()
        assert done["status"] == "succeeded", done
        version = client.get("/v1/models/sections/versions/1", headers=auth).json()
        yield registry, version


def test_the_published_text_version_has_its_tokenizer_card_and_onnx(
    text_version: tuple[Registry, dict[str, Any]],
) -> None:
    registry, version = text_version
    folder: Path = version_folder(registry.context, version["id"])
    names = {path.name for path in folder.iterdir()}
    assert {
        "weights.safetensors",
        "config.json",
        "tokenizer.json",
        "model.onnx",
        "card.md",
    } <= names
    assert version["exports"]["onnx"]["exported"] is True
    card = (folder / "card.md").read_text()
    assert "Token lengths" in card
    assert "| train | 48 |" in card


def test_predict_with_strings_answers_in_order(
    text_version: tuple[Registry, dict[str, Any]],
) -> None:
    registry, _ = text_version
    body = {
        "texts": ["PostgreSQL extension for full text search", "", LONG, "x" * 2001],
        "top_k": 2,
    }
    answered = registry.client.post(
        "/v1/models/sections/versions/1/predict", headers=registry.auth, json=body
    )
    assert answered.status_code == 200, answered.text
    predictions = answered.json()["predictions"]
    assert [p["text_index"] for p in predictions] == [0, 1, 2, 3]
    first, empty, long, oversized = predictions
    assert len(first["top"]) == 2
    assert first["truncated"] is False
    assert long["truncated"] is True
    assert long["top"] is not None
    assert empty["error"]["code"] == "empty_text"
    assert oversized["error"]["code"] == "text_too_long"
    assert empty["top"] is None
    metrics = registry.client.get("/metrics").text
    assert 'backend="onnx"' in metrics


def test_the_wrong_input_kind_is_a_422_naming_what_the_model_takes(
    text_version: tuple[Registry, dict[str, Any]],
) -> None:
    registry, _ = text_version
    client, auth = registry.client, registry.auth
    (png,) = held_out_pngs(1)
    images = {"images": [{"name": "a.png", "data": b64(png)}]}
    refused = client.post("/v1/models/sections/versions/1/predict", headers=auth, json=images)
    error = assert_error(refused, 422, "wrong_input_kind", "images")
    assert "classifies texts" in error["message"]
    multipart = client.post(
        "/v1/models/sections/versions/1/predict", headers=auth, files=[("images", ("a.png", png))]
    )
    assert_error(multipart, 422, "wrong_input_kind", "images")
    too_many = client.post(
        "/v1/models/sections/versions/1/predict", headers=auth, json={"texts": ["a"] * 5}
    )
    assert_error(too_many, 413, "too_many_texts", "texts")
    texts_to_images = client.post(
        "/v1/models/digits/versions/1/predict", headers=auth, json={"texts": ["a red square"]}
    )
    error = assert_error(texts_to_images, 422, "wrong_input_kind", "texts")
    assert "classifies images" in error["message"]
    not_strings = client.post(
        "/v1/models/sections/versions/1/predict", headers=auth, json={"texts": [1, {"a": 2}]}
    )
    assert not_strings.status_code == 422
