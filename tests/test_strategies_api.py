"""The transfer strategies through the API: chained transfer from a registered version,
Learning without Forgetting answering both tasks, explicit stages, and their errors."""

from typing import Any

import numpy as np
from fastapi.testclient import TestClient

from service.context import AppContext
from service.datasets.service import process_upload
from tests.conftest import digits_split, new_key, png_bytes, zip_of_classes
from tests.test_api import assert_error, small_spec
from worker import jobs


def digits_dataset(
    client: TestClient, context: AppContext, auth: dict[str, str], labels: list[int]
) -> str:
    pool, _ = digits_split()
    chosen: list[tuple[np.ndarray, int]] = []
    for label in labels:
        chosen += [item for item in pool if item[1] == label][:15]
    response = client.post(
        "/v1/datasets", headers=auth, files={"file": ("d.zip", zip_of_classes(chosen))}
    )
    process_upload(context=context, dataset_id=response.json()["id"])
    return str(response.json()["id"])


def train(
    client: TestClient, context: AppContext, auth: dict[str, str], spec: dict[str, Any]
) -> dict[str, Any]:
    created = client.post("/v1/jobs", headers=auth, json=spec)
    assert created.status_code == 201, created.text
    jobs.execute(context, job_id=created.json()["id"])
    done: dict[str, Any] = client.get(f"/v1/jobs/{created.json()['id']}", headers=auth).json()
    assert done["status"] == "succeeded", done
    return done


def test_lwf_on_a_registered_model_answers_both_tasks(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    old_data = digits_dataset(client, context, auth, [0, 1, 2])
    train(client, context, auth, small_spec(old_data, model="old"))
    new_data = digits_dataset(client, context, auth, [3, 4, 5])

    missing_parent = small_spec(new_data, model="new", strategy="lwf")
    assert_error(
        client.post("/v1/jobs", headers=auth, json=missing_parent),
        422,
        "invalid_spec",
        "base_model",
    )
    unknown = small_spec(new_data, model="new", strategy="lwf", base_model="model:old:9")
    assert_error(
        client.post("/v1/jobs", headers=auth, json=unknown),
        404,
        "base_model_not_found",
        "base_model",
    )
    other_team = new_key(context, "team-b")
    stolen = small_spec(new_data, model="new", strategy="fine_tune", base_model="model:old:1")
    assert_error(client.post("/v1/jobs", headers=other_team, json=stolen), 404, "dataset_not_found")

    spec = small_spec(new_data, model="new", strategy="lwf", base_model="model:old:1", epochs=3)
    preview = client.post("/v1/jobs/plan", headers=auth, json=spec).json()
    warmup, joint = preview["stages"]
    assert (warmup["name"], joint["name"]) == ("head", "joint")
    assert [g["name"] for g in warmup["trainable_groups"]] == ["head"]
    assert "old_heads" in [g["name"] for g in joint["trainable_groups"]]
    train(client, context, auth, spec)

    version = client.get("/v1/models/new/versions/1", headers=auth).json()
    assert version["lineage"]["base_model"]["source"] == "registry"
    assert version["lineage"]["base_model"]["model"] == "old"
    assert version["base_model"] == "efficientnet_lite0"

    _, held_out = digits_split()
    images = [("images", (f"{label}.png", png_bytes(image))) for image, label in held_out[:60]]
    newest = client.post("/v1/models/new/versions/1/predict", headers=auth, files=images).json()
    assert newest["task"] == "new"
    assert {t["label"] for p in newest["predictions"] for t in p["top"]} <= {
        "digit_3",
        "digit_4",
        "digit_5",
    }
    old = client.post(
        "/v1/models/new/versions/1/predict", headers=auth, files=images, data={"task": "old"}
    ).json()
    assert old["task"] == "old"
    assert {t["label"] for p in old["predictions"] for t in p["top"]} <= {
        "digit_0",
        "digit_1",
        "digit_2",
    }
    wrong = client.post(
        "/v1/models/new/versions/1/predict", headers=auth, files=images[:1], data={"task": "x"}
    )
    assert_error(wrong, 422, "unknown_task", "task")


def test_explicit_stages_and_new_presets_preview(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    dataset = digits_dataset(client, context, auth, [0, 1])
    stages = [
        {"groups": ["head"], "epochs": 1, "lr": 0.01},
        {"groups": ["top:2"], "epochs": 2, "lr": 0.001, "schedule": "one_cycle"},
    ]
    preview = client.post(
        "/v1/jobs/plan", headers=auth, json=small_spec(dataset, stages=stages)
    ).json()
    assert [s["epochs"] for s in preview["stages"]] == [1, 2]
    assert [g["name"] for g in preview["stages"][1]["trainable_groups"]][-1] == "head"
    assert len(preview["stages"][1]["trainable_groups"]) == 3
    bad = small_spec(dataset, stages=[{"groups": ["layer9"]}])
    error = assert_error(client.post("/v1/jobs/plan", headers=auth, json=bad), 422, "invalid_spec")
    assert error["param"] == "stages[0].groups"
    assert "layer9" in error["message"]
    for strategy in ("partial", "gradual_unfreeze", "scratch"):
        spec = small_spec(dataset, strategy=strategy, epochs=3, pretrained=strategy != "scratch")
        shown = client.post("/v1/jobs/plan", headers=auth, json=spec)
        assert shown.status_code == 200, (strategy, shown.text)
    gradual = client.post(
        "/v1/jobs/plan",
        headers=auth,
        json=small_spec(dataset, strategy="gradual_unfreeze", epochs=4),
    ).json()
    trainable = [s["trainable_parameters"] for s in gradual["stages"]]
    assert trainable == sorted(trainable), "one more group unfrozen each epoch"
    resized = small_spec(
        dataset, strategy="fine_tune", image_size=96, progressive_resizing=[64, 96], epochs=2
    )
    sizes = [
        s["image_size"]
        for s in client.post("/v1/jobs/plan", headers=auth, json=resized).json()["stages"]
    ]
    assert sizes == [64, 96]
