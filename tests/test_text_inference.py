"""Predict with strings over HTTP, on a text version the worker published from a real text
dataset (a CSV of Debian package descriptions, uploaded and ingested): answers in order with
`text_index` and `truncated`, per-item errors for empty and oversized texts, the ONNX Runtime
backend, and a 422 naming the input kind a model takes.
"""

import csv
import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

import worker.jobs as jobs
from service.cli import migrate_database
from service.datasets.service import process_upload
from service.main import create_app
from tests.conftest import make_settings, new_key, version_folder
from tests.engine.test_text_train import debian_texts
from tests.test_api import assert_error, ready_dataset
from tests.test_inference import assert_distinct_answers, assert_same_top, b64, held_out_pngs
from tests.test_registry import Registry, publish
from worker.engine import Predictor

FIRST = "PostgreSQL extension for full text search"
LONG = "a free software implementation of the classic card game " * 20


def sections_csv(per_class: int) -> bytes:
    """`per_class` real descriptions of each of the fixture's six sections, as an upload."""
    samples, classes = debian_texts(per_class)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["text", "label"])
    writer.writerows([sample.text, classes[sample.label]] for sample in samples)
    return out.getvalue().encode()


@pytest.fixture(scope="module")
def text_version(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Registry, dict[str, Any], int]]:
    """The registry, the published text version and how many texts it trained on."""
    settings = make_settings(
        tmp_path_factory.mktemp("text-inference") / "data",
        max_predict_texts=4,
        max_predict_text_chars=2000,
    )
    migrate_database(settings)
    with TestClient(create_app(settings)) as client:
        context = client.app.state.context  # type: ignore[attr-defined]
        auth = new_key(context, "team-a")
        registry = Registry(
            client, context, auth, ready_dataset(client, context, auth, classes=6, per_class=2)
        )
        publish(registry, epochs=1)  # an image model, `digits`, for texts sent to it
        uploaded = client.post(
            "/v1/datasets",
            headers=auth,
            files={"file": ("sections.csv", sections_csv(11))},
            data={"val_fraction": "0.25"},
        )
        assert uploaded.status_code == 202, uploaded.text
        dataset_id = uploaded.json()["id"]
        process_upload(context=context, dataset_id=dataset_id)
        dataset = client.get(f"/v1/datasets/{dataset_id}", headers=auth).json()
        assert dataset["status"] == "ready", dataset
        train_texts = sum(counts["train"] for counts in dataset["class_counts"].values())
        spec = {
            "dataset": dataset_id,
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
        assert job.json()["plan"]["preprocessing"]["max_length"] == 24
        jobs.execute(context, job_id=job.json()["id"])
        done = client.get(f"/v1/jobs/{job.json()['id']}", headers=auth).json()
        assert done["status"] == "succeeded", done
        version = client.get("/v1/models/sections/versions/1", headers=auth).json()
        assert version["labels"] == dataset["classes"]
        # A small set refits by default: the published text model trained on every label.
        labelled = sum(counts["total"] for counts in dataset["class_counts"].values())
        assert version["metrics"]["refit"]["train_items"] == labelled
        yield registry, version, train_texts


def test_the_published_text_version_has_its_tokenizer_card_and_onnx(
    text_version: tuple[Registry, dict[str, Any], int],
) -> None:
    registry, version, train_texts = text_version
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
    assert f"| train | {train_texts} |" in card
    # The data line counts the labelled texts (training and validation), not images.
    counted = re.search(r"\): (\d+) texts in \d+ classes\.", card)
    assert counted is not None
    assert int(counted[1]) > train_texts
    # Each stage says what it read in the text modality's words, not an image size.
    assert "epoch(s) on texts of up to 24 tokens" in card
    assert " px" not in card


def test_predict_with_strings_answers_in_order(
    text_version: tuple[Registry, dict[str, Any], int],
) -> None:
    registry, _, _ = text_version
    body = {
        "texts": [FIRST, "", LONG, "x" * 2001],
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
    # Each answer belongs to its own text: checked against the torch predictor, which shares no
    # code with the service's answer assembly.
    version = registry.client.get("/v1/models/sections/versions/1", headers=registry.auth).json()
    predictor = Predictor.load(version_folder(registry.context, version["id"]))
    want_first, want_long = predictor.predict([FIRST, LONG], top_k=2)
    assert_distinct_answers(want_first, want_long)
    assert_same_top(first["top"], want_first, atol=1e-4)
    assert_same_top(long["top"], want_long, atol=1e-4)
    metrics = registry.client.get("/metrics").text
    assert 'backend="onnx"' in metrics


def test_the_wrong_input_kind_is_a_422_naming_what_the_model_takes(
    text_version: tuple[Registry, dict[str, Any], int],
) -> None:
    registry, _, _ = text_version
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


def test_open_inference_protocol_with_strings(
    text_version: tuple[Registry, dict[str, Any], int],
) -> None:
    import numpy as np
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    from tests.conftest import served_over_http

    registry, version, _ = text_version
    client, auth = registry.client, registry.auth
    texts = ["PostgreSQL extension for full text search", LONG, "a card game"]
    labels = version["labels"]
    answer = client.post(
        "/v1/models/sections/versions/1/predict",
        headers=auth,
        json={"texts": texts, "top_k": len(labels)},
    ).json()["predictions"]
    expected = np.array(
        [
            [{t["label"]: t["probability"] for t in p["top"]}[label] for label in labels]
            for p in answer
        ]
    )
    with served_over_http(client.app) as url:
        triton_client = triton.InferenceServerClient(url)
        metadata = triton_client.get_model_metadata("sections", headers=auth)
        assert metadata["inputs"] == [{"name": "texts", "datatype": "BYTES", "shape": [-1]}]
        assert metadata["outputs"][0]["parameters"]["labels"] == labels
        for binary in (True, False):
            strings = triton.InferInput("texts", [len(texts)], "BYTES")
            strings.set_data_from_numpy(
                np.array([text.encode() for text in texts], dtype=np.object_), binary_data=binary
            )
            result = triton_client.infer(
                "sections", [strings], model_version="1", headers=dict(auth)
            )
            np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-5)
            best = [labels[i].encode() for i in expected.argmax(axis=1)]
            assert list(result.as_numpy("top_labels")[:, 0]) == best
        empty = triton.InferInput("texts", [1], "BYTES")
        empty.set_data_from_numpy(np.array([b" "], dtype=np.object_))
        with pytest.raises(InferenceServerException) as refused:
            triton_client.infer("sections", [empty], headers=dict(auth))
        assert refused.value.status() == "400"
        assert "empty" in str(refused.value.message())
        triton_client.close()


def test_text_exports_load_in_transformers_triton_and_mlflow_and_answer_as_predict(
    text_version: tuple[Registry, dict[str, Any], int], tmp_path: Path
) -> None:
    import mlflow.pyfunc
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tests.test_inference import exported, run_declared, softmax, triton_config
    from worker.engine.artifacts import read_model_config
    from worker.engine.modalities.text.exported import ExportedTextPreprocessing
    from worker.engine.modalities.text.tokens import SpecialTokens, encode, load_backend, pad

    registry, version, _ = text_version
    client, auth = registry.client, registry.auth
    path = "/v1/models/sections/versions/1"
    texts = ["PostgreSQL extension for full text search", LONG, "a card game"]
    labels = version["labels"]
    answer = client.post(
        f"{path}/predict", headers=auth, json={"texts": texts, "top_k": len(labels)}
    ).json()["predictions"]
    expected = np.array(
        [
            [{t["label"]: t["probability"] for t in p["top"]}[label] for label in labels]
            for p in answer
        ]
    )

    folder = exported(client, auth, path, "hf", tmp_path / "hf")
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**batch).logits
    answered = torch.softmax(logits, dim=-1).numpy()
    assert [model.config.id2label[i] for i in range(len(labels))] == labels
    np.testing.assert_allclose(answered, expected, atol=1e-5)

    thaw_folder = version_folder(registry.context, version["id"])
    config = read_model_config(thaw_folder)
    text = ExportedTextPreprocessing.of(config)
    encoded = encode(
        load_backend(thaw_folder),
        texts,
        SpecialTokens.from_dict(text.special_tokens),
        max_length=text.max_length,
        truncation=text.truncation,
    )
    ids, mask = pad(encoded.ids, text.special_tokens["pad_id"])
    entry = exported(client, auth, path, "triton", tmp_path / "triton") / "sections"
    triton = triton_config(entry)
    logits = run_declared(entry, triton, {"input_ids": ids, "attention_mask": mask})
    np.testing.assert_allclose(softmax(logits / config.temperature), expected, atol=1e-5)

    loaded = mlflow.pyfunc.load_model(str(exported(client, auth, path, "mlflow", tmp_path / "ml")))
    np.testing.assert_allclose(loaded.predict(texts)[labels].to_numpy(), expected, atol=1e-5)
