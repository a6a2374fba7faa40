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
    client: TestClient,
    context: AppContext,
    auth: dict[str, str],
    labels: list[int],
    per_label: int = 15,
) -> str:
    pool, _ = digits_split()
    chosen: list[tuple[np.ndarray, int]] = []
    for label in labels:
        chosen += [item for item in pool if item[1] == label][:per_label]
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


def predict(
    client: TestClient,
    auth: dict[str, str],
    items: list[tuple[np.ndarray, int]],
    **fields: str,
) -> dict[str, Any]:
    images = [("images", (f"{n}.png", png_bytes(image))) for n, (image, _) in enumerate(items)]
    answer = client.post(
        "/v1/models/new/versions/1/predict", headers=auth, files=images, data=fields
    )
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def accuracy(
    answer: dict[str, Any], items: list[tuple[np.ndarray, int]], task_labels: set[str]
) -> float:
    """Top-1 accuracy; every prediction must rank exactly the task's labels."""
    predictions = answer["predictions"]
    assert len(predictions) == len(items)
    for prediction in predictions:
        assert {t["label"] for t in prediction["top"]} == task_labels, prediction
    hits = [
        p["top"][0]["label"] == f"digit_{label}"
        for p, (_, label) in zip(predictions, items, strict=True)
    ]
    return sum(hits) / len(items)


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
    parent = client.get("/v1/models/old/versions/1", headers=auth).json()
    # The parent is named by its files' storage key, which any host can fetch; no host path.
    assert version["plan"]["parent"] == f"models/{parent['job_id']}/attempt-1"
    assert "parent_dir" not in version["plan"]
    assert version["lineage"]["base_model"]["source"] == "registry"
    assert version["lineage"]["base_model"]["model"] == "old"
    assert version["base_model"] == "efficientnet_lite0"

    _, held_out = digits_split()
    old_digits = [item for item in held_out if item[1] in (0, 1, 2)]
    new_digits = [item for item in held_out if item[1] in (3, 4, 5)]
    newest = predict(client, auth, new_digits)
    assert newest["task"] == "new"
    new_accuracy = accuracy(newest, new_digits, {"digit_3", "digit_4", "digit_5"})
    old = predict(client, auth, old_digits, task="old")
    assert old["task"] == "old"
    # The old task still answers the old digits: its head and the features it reads were
    # kept by the distillation term while the backbone learned the new digits.
    old_accuracy = accuracy(old, old_digits, {"digit_0", "digit_1", "digit_2"})
    print(f"held-out accuracy: new task {new_accuracy:.2f}, old task {old_accuracy:.2f}")
    assert new_accuracy >= 0.7
    assert old_accuracy >= 0.7
    images = [("images", (f"{label}.png", png_bytes(image))) for image, label in held_out[:1]]
    wrong = client.post(
        "/v1/models/new/versions/1/predict", headers=auth, files=images, data={"task": "x"}
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
    uneven = small_spec(dataset, gpus=3)
    error = assert_error(
        client.post("/v1/jobs/plan", headers=auth, json=uneven), 422, "invalid_spec"
    )
    assert (error["param"], error["message"].split(";")[0]) == (
        "gpus",
        "gpus: batch_size 16 does not split evenly over 3 processes",
    )
    two = client.post("/v1/jobs/plan", headers=auth, json=small_spec(dataset, gpus=2))
    assert two.status_code == 200, two.text
    plans = {}
    for strategy in ("partial", "gradual_unfreeze", "scratch"):
        spec = small_spec(dataset, strategy=strategy, epochs=3, pretrained=strategy != "scratch")
        shown = client.post("/v1/jobs/plan", headers=auth, json=spec)
        assert shown.status_code == 200, (strategy, shown.text)
        plans[strategy] = shown.json()["stages"]
    # partial: one stage training the top backbone groups and the head, the rest frozen.
    [partial] = plans["partial"]
    partial_groups = [g["name"] for g in partial["trainable_groups"]]
    assert (partial["name"], partial["epochs"]) == ("partial", 3)
    assert partial_groups[-1] == "head"
    assert len(partial_groups) >= 2, partial_groups
    assert 0 < partial["trainable_parameters"] < partial["total_parameters"]
    # gradual_unfreeze: the head alone, then one more group from the top each epoch.
    gradual = plans["gradual_unfreeze"]
    assert [s["name"] for s in gradual] == ["head", "unfreeze_top_1", "unfreeze_top_2"]
    assert [s["epochs"] for s in gradual] == [1, 1, 1]
    assert [len(s["trainable_groups"]) for s in gradual] == [1, 2, 3]
    assert [g["name"] for g in gradual[2]["trainable_groups"]][:2] == partial_groups[-3:-1]
    # scratch: every parameter trains, every group at the one rate asked for.
    [scratch] = plans["scratch"]
    assert scratch["name"] == "scratch"
    assert scratch["trainable_parameters"] == scratch["total_parameters"]
    assert {g["lr"] for g in scratch["trainable_groups"]} == {0.01}
    longer = client.post(
        "/v1/jobs/plan",
        headers=auth,
        json=small_spec(dataset, strategy="gradual_unfreeze", epochs=4),
    ).json()
    trainable = [s["trainable_parameters"] for s in longer["stages"]]
    assert trainable == sorted(trainable), "one more group unfrozen each epoch"
    resized = small_spec(
        dataset, strategy="fine_tune", image_size=96, progressive_resizing=[64, 96], epochs=2
    )
    sizes = [
        s["image_size"]
        for s in client.post("/v1/jobs/plan", headers=auth, json=resized).json()["stages"]
    ]
    assert sizes == [64, 96]


def test_a_job_on_two_processes_reports_and_publishes_once(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    dataset = digits_dataset(client, context, auth, [0, 1])
    done = train(client, context, auth, small_spec(dataset, model="pair", gpus=2))
    assert done["progress"] == 1.0
    events = client.get(f"/v1/jobs/{done['id']}/events", headers=auth).json()["data"]
    # Rank 0 alone writes events: one per epoch, not one per rank.
    assert [e["data"]["global_epoch"] for e in events if e["kind"] == "epoch"] == [1, 2]
    versions = client.get("/v1/models/pair/versions", headers=auth).json()["data"]
    assert [version["job_id"] for version in versions] == [done["id"]]
