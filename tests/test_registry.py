"""The registry: aliases, tags, search filters, archive, delete, version page, artifacts, ONNX."""

import base64
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from service.cli import migrate_database
from service.context import AppContext
from service.main import create_app
from tests.conftest import digits_split, make_settings, new_key, version_folder
from tests.test_api import assert_error, ready_dataset, small_spec
from worker import jobs
from worker.engine import Predictor, TransferConfig, build_model, compile_plan, preprocess
from worker.engine.onnx_export import export_onnx


@dataclass
class Registry:
    client: TestClient
    context: AppContext
    auth: dict[str, str]
    dataset_id: str


def publish(registry: Registry, **overrides: Any) -> dict[str, Any]:
    """Train a tiny job in-process and return its version."""
    spec = small_spec(registry.dataset_id, **overrides)
    job = registry.client.post("/v1/jobs", headers=registry.auth, json=spec).json()
    jobs.execute(registry.context, job_id=job["id"])
    done = registry.client.get(f"/v1/jobs/{job['id']}", headers=registry.auth).json()
    assert done["status"] == "succeeded", done
    versions = registry.client.get(
        f"/v1/models/{spec['model']}/versions?limit=200&include_archived=true",
        headers=registry.auth,
    ).json()["data"]
    return next(v for v in versions if v["job_id"] == job["id"])


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """Two versions of `digits`: v1 feature extraction (2 epochs), v2 fine-tuned (1 epoch) and
    refit on train + validation."""
    settings = make_settings(tmp_path_factory.mktemp("registry") / "data")
    migrate_database(settings)
    with TestClient(create_app(settings)) as client:
        context: AppContext = client.app.state.context  # type: ignore[attr-defined]
        auth = new_key(context, "team-a")
        made = Registry(client, context, auth, ready_dataset(client, context, auth))
        publish(made)
        publish(made, strategy="fine_tune", epochs=1, refit=True)
        yield made


def test_a_refit_version_trained_on_every_label(registry: Registry) -> None:
    client, auth = registry.client, registry.auth
    dataset = client.get(f"/v1/datasets/{registry.dataset_id}", headers=auth).json()
    labelled = sum(counts["total"] for counts in dataset["class_counts"].values())
    versions = [client.get(f"/v1/models/digits/versions/{n}", headers=auth).json() for n in (1, 2)]
    assert "refit" not in versions[0]["metrics"]
    assert versions[1]["metrics"]["refit"]["train_items"] == labelled


def test_aliases_are_created_moved_and_deleted(registry: Registry) -> None:
    client, auth = registry.client, registry.auth
    put = client.put("/v1/models/digits/aliases/production", headers=auth, json={"version": 1})
    assert put.status_code == 200, put.text
    assert put.json() == {"model": "digits", "alias": "production", "version": 1}
    assert client.get("/v1/models/digits/versions/production", headers=auth).json()["version"] == 1

    moved = client.put("/v1/models/digits/aliases/production", headers=auth, json={"version": 2})
    assert moved.json()["version"] == 2
    shown = client.get("/v1/models/digits/versions/production", headers=auth).json()
    assert (shown["version"], shown["aliases"]) == (2, ["production"])
    assert client.get("/v1/models/digits/versions/1", headers=auth).json()["aliases"] == []
    assert client.get("/v1/models/digits", headers=auth).json()["aliases"] == {"production": 2}

    assert client.delete("/v1/models/digits/aliases/production", headers=auth).status_code == 204
    assert_error(
        client.get("/v1/models/digits/versions/production", headers=auth),
        404,
        "version_not_found",
        "version",
    )
    assert_error(
        client.delete("/v1/models/digits/aliases/production", headers=auth),
        404,
        "alias_not_found",
        "alias",
    )
    assert_error(
        client.put("/v1/models/digits/aliases/staging", headers=auth, json={"version": 99}),
        404,
        "version_not_found",
        "version",
    )
    # All digits would shadow version numbers.
    assert_error(
        client.put("/v1/models/digits/aliases/7", headers=auth, json={"version": 1}),
        422,
        "invalid_request",
        "alias",
    )
    assert_error(
        client.put("/v1/models/digits/aliases/staging", headers=auth, json={"version": "x"}),
        422,
        "invalid_request",
        "version",
    )


def _listed(registry: Registry, query: str) -> list[dict[str, Any]]:
    response = registry.client.get(f"/v1/model-versions?{query}", headers=registry.auth)
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


def test_search_filters_order_and_paginate(registry: Registry) -> None:
    client, auth = registry.client, registry.auth
    both = _listed(registry, "")
    assert [v["version"] for v in both] == [1, 2]
    assert [v["version"] for v in _listed(registry, "strategy=fine_tune")] == [2]
    assert [v["version"] for v in _listed(registry, "base_model=resnet18")] == []
    assert len(_listed(registry, f"dataset={registry.dataset_id}")) == 2
    assert len(_listed(registry, "metric=val_accuracy>=0")) == 2
    assert _listed(registry, "metric=val_accuracy>1") == []
    assert _listed(registry, "metric=no_such_metric>=0") == []
    # Both bounds at once: only a version whose accuracy is exactly v1's.
    v1_accuracy = both[0]["metrics"]["val_accuracy"]
    exact = _listed(
        registry, f"metric=val_accuracy>={v1_accuracy}&metric=val_accuracy<={v1_accuracy}"
    )
    assert 1 in [v["version"] for v in exact]

    descending = _listed(registry, "order=-val_accuracy")
    accuracies = [v["metrics"]["val_accuracy"] for v in descending]
    assert accuracies == sorted(accuracies, reverse=True)
    assert [v["version"] for v in _listed(registry, "order=-version")] == [2, 1]
    first = client.get("/v1/model-versions?order=-version&limit=1", headers=auth).json()
    assert (first["data"][0]["version"], first["has_more"]) == (2, True)
    second = client.get(
        f"/v1/model-versions?order=-version&limit=1&after={first['last_id']}", headers=auth
    ).json()
    assert (second["data"][0]["version"], second["has_more"]) == (1, False)

    for bad in ("val_accuracy>>0.9", "val_accuracy>=abc", "val_accuracy>=nan", "1x>=2", ">=3"):
        assert_error(
            client.get("/v1/model-versions", params={"metric": bad}, headers=auth),
            422,
            "invalid_filter",
            "metric",
        )
    assert_error(
        client.get("/v1/model-versions?order=val accuracy", headers=auth),
        422,
        "invalid_order",
        "order",
    )
    assert_error(
        client.get("/v1/model-versions?after=mv_nope", headers=auth),
        422,
        "invalid_request",
        "after",
    )
    per_model = client.get("/v1/models/digits/versions?order=-version", headers=auth).json()
    assert [v["version"] for v in per_model["data"]] == [2, 1]


def test_tags_on_models_and_versions(registry: Registry) -> None:
    client, auth = registry.client, registry.auth
    tagged = client.patch("/v1/models/digits/versions/2", headers=auth, json={"tags": ["best"]})
    assert tagged.status_code == 200, tagged.text
    assert tagged.json()["tags"] == ["best"]
    assert [v["version"] for v in _listed(registry, "tag=best")] == [2]
    model = client.patch("/v1/models/digits", headers=auth, json={"tags": ["vision", "vision"]})
    assert model.json()["tags"] == ["vision"]
    # A model's tag describes every version of it.
    assert len(_listed(registry, "tag=vision")) == 2
    assert [v["version"] for v in _listed(registry, "tag=vision&tag=best")] == [2]
    listed = client.get("/v1/models?tag=vision", headers=auth).json()["data"]
    assert [m["name"] for m in listed] == ["digits"]
    assert client.get("/v1/models?tag=other", headers=auth).json()["data"] == []
    assert_error(
        client.patch("/v1/models/digits", headers=auth, json={"tags": ["has space"]}),
        422,
        "invalid_request",
        "tags.0",
    )
    client.patch("/v1/models/digits/versions/2", headers=auth, json={"tags": []})
    client.patch("/v1/models/digits", headers=auth, json={"tags": []})
    assert _listed(registry, "tag=best") == []


def test_archived_versions_leave_lists_but_stay_addressable(registry: Registry) -> None:
    client, auth = registry.client, registry.auth
    archived = client.patch("/v1/models/digits/versions/2", headers=auth, json={"archived": True})
    assert archived.json()["archived"] is True
    assert [v["version"] for v in _listed(registry, "")] == [1]
    listed = client.get("/v1/models/digits/versions", headers=auth).json()["data"]
    assert [v["version"] for v in listed] == [1]
    assert [v["version"] for v in _listed(registry, "include_archived=true")] == [1, 2]
    assert client.get("/v1/models/digits", headers=auth).json()["latest_version"]["version"] == 1
    assert client.get("/v1/models/digits/versions/2", headers=auth).json()["archived"] is True
    client.patch("/v1/models/digits/versions/2", headers=auth, json={"archived": False})
    assert [v["version"] for v in _listed(registry, "")] == [1, 2]


def test_version_page_artifacts_and_card(registry: Registry) -> None:
    client, auth = registry.client, registry.auth
    page = client.get("/v1/models/digits/versions/1", headers=auth).json()
    assert {a["name"] for a in page["artifacts"]} == {
        "weights.safetensors",
        "config.json",
        "labels.json",
        "card.md",
        "model.onnx",
    }
    for artifact in page["artifacts"]:
        body = client.get(
            f"/v1/models/digits/versions/1/artifacts/{artifact['name']}", headers=auth
        ).content
        assert len(body) == artifact["size"], artifact
        assert hashlib.sha256(body).hexdigest() == artifact["sha256"], artifact
    labels = client.get("/v1/models/digits/versions/1/artifacts/labels.json", headers=auth)
    assert labels.json() == page["labels"]
    assert [(h["stage"], h["epoch"]) for h in page["history"]] == [("head", 1), ("head", 2)]
    assert len(page["metrics"]["confusion_matrix"]) == 3
    # The recipe's metrics reach the version: macro-F1, and the temperature config.json holds.
    assert 0.0 <= page["metrics"]["macro_f1"] <= 1.0
    calibration = page["metrics"]["calibration"]
    assert {"temperature", "ece_before", "ece_after", "ece_after_held_out"} <= set(calibration)
    config = client.get("/v1/models/digits/versions/1/artifacts/config.json", headers=auth).json()
    assert config["calibration"]["temperature"] == calibration["temperature"]
    assert page["lineage"]["dataset"]["id"] == registry.dataset_id
    assert page["lineage"]["dataset"]["classes"] == page["labels"]
    assert page["lineage"]["job"]["status"] == "succeeded"
    assert page["lineage"]["base_model"] == {
        "name": "efficientnet_lite0",
        "source": "zoo",
        "model": None,
        "version": None,
        "version_id": None,
    }
    onnx = page["exports"]["onnx"]
    assert onnx["exported"] is True
    assert onnx["max_abs_diff"] < 1e-4

    card = client.get("/v1/models/digits/versions/1/artifacts/card.md", headers=auth).text
    assert card.startswith("# Model card: digits")
    needles = (
        "## Data",
        "| digit_0 |",
        "## Intended use",
        "## Limits",
        "feature_extraction",
        "## How far the probabilities can be trusted",
        "macro-F1",
    )
    for needle in needles:
        assert needle in card, needle
    # Twelve images per class, so every class is below the few-examples threshold.
    assert "fewer than 20 training images: digit_0, digit_1, digit_2" in card
    missing = client.get("/v1/models/digits/versions/1/artifacts/weights.pt", headers=auth)
    assert_error(missing, 404, "artifact_not_found", "artifact")


def test_onnx_model_matches_pytorch_on_real_images(registry: Registry) -> None:
    version = registry.client.get("/v1/models/digits/versions/1", headers=registry.auth).json()
    assert version["exports"]["onnx"]["exported"]
    folder = version_folder(registry.context, version["id"])
    predictor = Predictor.load(folder)
    _, held_out = digits_split()

    prep = predictor.config["preprocessing"]
    batch = torch.stack(
        [
            preprocess(
                Image.fromarray(image),
                image_size=prep["image_size"],
                mean=prep["mean"],
                std=prep["std"],
            )
            for image, _ in held_out[:7]
        ]
    )
    with torch.no_grad():
        expected = predictor.model(batch).numpy()
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"))
    (actual,) = session.run(["logits"], {"images": batch.numpy()})
    assert np.abs(actual - expected).max() < 1e-4


def test_onnx_export_refuses_a_model_outside_tolerance(tmp_path: Path) -> None:
    plan = compile_plan(
        TransferConfig(
            base_model="efficientnet_lite0",
            strategy="feature_extraction",
            num_classes=2,
            image_size=64,
            pretrained=False,
        )
    )
    model = build_model(plan, weights_dir=None, pretrained=False)
    out = tmp_path / "model.onnx"
    passed = export_onnx(model, image_size=64, out_path=out)
    assert passed.exported
    assert out.exists()
    assert passed.max_abs_diff is not None
    assert passed.max_abs_diff < 1e-4
    refused = export_onnx(model, image_size=64, out_path=out, tolerance=0.0)
    assert not refused.exported
    assert "tolerance" in str(refused.reason)
    assert not out.exists()
    assert model.training is True  # the export put the model back the way it found it


def test_delete_is_refused_while_aliased_and_removes_artifacts(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    registry = Registry(client, context, auth, ready_dataset(client, context, auth))
    first = publish(registry, epochs=1)
    prefix = version_folder(context, first["id"])
    assert (prefix / "weights.safetensors").exists()
    client.put("/v1/models/digits/aliases/production", headers=auth, json={"version": 1})
    assert_error(
        client.delete("/v1/models/digits/versions/1", headers=auth),
        409,
        "version_has_aliases",
        "version",
    )
    assert_error(client.delete("/v1/models/digits", headers=auth), 409, "model_has_versions")
    client.delete("/v1/models/digits/aliases/production", headers=auth)
    assert client.delete("/v1/models/digits/versions/1", headers=auth).status_code == 204
    assert not prefix.exists()
    assert_error(client.get("/v1/models/digits/versions/1", headers=auth), 404, "version_not_found")
    # The model stays and its numbers are never reused.
    assert client.get("/v1/models/digits", headers=auth).json()["latest_version"] is None
    assert publish(registry, epochs=1)["version"] == 2
    client.delete("/v1/models/digits/versions/2", headers=auth)
    assert client.delete("/v1/models/digits", headers=auth).status_code == 204
    assert_error(client.get("/v1/models/digits", headers=auth), 404, "model_not_found")


def test_other_tenants_see_nothing(registry: Registry) -> None:
    client = registry.client
    other = new_key(registry.context, "team-b")
    base = "/v1/models/digits"
    requests: list[tuple[str, str, Any]] = [
        ("GET", base, None),
        ("PATCH", base, {"tags": ["x"]}),
        ("DELETE", base, None),
        ("GET", f"{base}/versions", None),
        ("GET", f"{base}/versions/1", None),
        ("PATCH", f"{base}/versions/1", {"archived": True}),
        ("DELETE", f"{base}/versions/1", None),
        ("PUT", f"{base}/aliases/production", {"version": 1}),
        ("DELETE", f"{base}/aliases/production", None),
        ("GET", f"{base}/versions/1/artifacts/card.md", None),
        ("GET", f"{base}/versions/1/artifacts/model.onnx", None),
    ]
    for method, path, body in requests:
        response = client.request(method, path, headers=other, json=body)
        assert response.status_code == 404, (method, path, response.text)
        assert "digit_0" not in response.text
    assert client.get("/v1/model-versions", headers=other).json()["data"] == []
    assert client.get("/v1/models?tag=vision", headers=other).json()["data"] == []
    # And nothing changed for the owner.
    mine = client.get("/v1/models/digits/versions/1", headers=registry.auth).json()
    assert mine["archived"] is False
    assert json.dumps(mine["tags"]) == "[]"


def test_recipe_reaches_the_card_the_dashboard_and_predict_over_onnx(registry: Registry) -> None:
    """TTA and EMA on: the card and the models page say so, and predict over HTTP (ONNX
    Runtime) averages the same views as the torch predictor and the final validation."""
    client, auth = registry.client, registry.auth
    version = publish(registry, model="digits-recipe", tta="flip_crops", ema=0.9)
    assert version["exports"]["onnx"]["exported"]
    tta = version["metrics"]["tta"]
    assert (tta["mode"], len(tta["views"])) == ("flip_crops", 12)
    card = client.get("/v1/models/digits-recipe/versions/1/artifacts/card.md", headers=auth).text
    for needle in (
        "at a top rate of 0.01",
        "Weight average (EMA): decay 0.9,",
        "Test-time augmentation `flip_crops`: predict averages the probabilities of 12 views",
        "With test-time augmentation (`flip_crops`",
    ):
        assert needle in card, needle
    plain = client.get("/v1/models/digits/versions/1/artifacts/card.md", headers=auth).text
    assert "Weight average (EMA): off." in plain
    assert "Test-time augmentation: off" in plain
    signed_in = {"Cookie": f"thaw_key={auth['Authorization'].removeprefix('Bearer ')}"}
    page = client.get("/ui/models", headers=signed_in).text
    assert "augment none · EMA 0.9 · TTA flip_crops:" in page
    _, held_out = digits_split()
    images = [Image.fromarray(image) for image, _ in held_out[:4]]
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode())
    answer = client.post(
        "/v1/models/digits-recipe/versions/1/predict",
        headers=auth,
        json={
            "images": [{"name": f"{i}.png", "data": data} for i, data in enumerate(encoded)],
            "top_k": 3,
            "calibrated": False,
        },
    )
    assert answer.status_code == 200, answer.text
    cache = client.app.state.predictors  # type: ignore[attr-defined]
    assert cache._loaded[version["id"]].backend == "onnx"
    predictor = Predictor.load(version_folder(registry.context, version["id"]))
    expected = predictor.predict(images, top_k=3, calibrated=False)
    for served, want in zip(answer.json()["predictions"], expected, strict=True):
        got = [(entry["label"], entry["probability"]) for entry in served["top"]]
        assert [label for label, _ in got] == [label for label, _ in want]
        assert [p for _, p in got] == pytest.approx([p for _, p in want], abs=1e-4)
