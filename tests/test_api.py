"""API behaviour on the embedded stack: errors, validation, auth, tenancy, jobs, registry, predict.

Background work (ingestion, training) is run in-process by calling the same functions the Celery
tasks call, so each test controls exactly when it happens."""

import io
import threading
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.context import AppContext
from service.datasets.imbalance import imbalance_report
from service.datasets.service import process_upload
from service.queues import this_host_has_cuda
from tests.conftest import digits_split, new_key, png_bytes, zip_of_classes
from worker import jobs


def upload(
    client: TestClient, auth: dict[str, str], archive: bytes, **fields: str
) -> dict[str, Any]:
    response = client.post(
        "/v1/datasets", headers=auth, files={"file": ("digits.zip", archive)}, data=fields
    )
    assert response.status_code == 202, response.text
    return response.json()


def ready_dataset(
    client: TestClient,
    context: AppContext,
    auth: dict[str, str],
    classes: int = 3,
    per_class: int = 12,
    names: list[str] | None = None,
) -> str:
    pool, _ = digits_split()
    items = [item for item in pool if item[1] < classes]
    chosen: list[tuple[np.ndarray, int]] = []
    for label in range(classes):
        chosen += [item for item in items if item[1] == label][:per_class]
    dataset = upload(client, auth, zip_of_classes(chosen, names))
    process_upload(context=context, dataset_id=dataset["id"])
    shown = client.get(f"/v1/datasets/{dataset['id']}", headers=auth).json()
    assert shown["status"] == "ready", shown
    return str(dataset["id"])


def small_spec(dataset_id: str, **overrides: Any) -> dict[str, Any]:
    spec = {
        "dataset": dataset_id,
        "model": "digits",
        "base_model": "efficientnet_lite0",
        "strategy": "feature_extraction",
        "epochs": 2,
        "batch_size": 16,
        "lr": 0.01,
        "image_size": 64,
        "seed": 1,
        # Epoch-by-epoch behaviour (events, progress, pause) needs a stepped head: a solved
        # one takes a single epoch (tests/engine/test_linear_probe.py).
        "solve_head": False,
        # One run per job, whose events and progress these tests follow (a set this small
        # refits by default: a second run on train + validation).
        "refit": False,
    }
    return {**spec, **overrides}


def assert_error(response: Any, status: int, code: str, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    assert error["message"]
    return dict(error)


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    checks = {"database": "ok", "broker": "ok", "storage": "ok", "workers": "ok"}
    assert ready.json()["checks"] == checks


@pytest.mark.parametrize("header", [None, "Bearer nope", "Basic abc", "Bearer thaw_" + "x" * 43])
def test_bad_or_missing_key_is_401(client: TestClient, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    response = client.get("/v1/datasets", headers=headers)
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"


def test_unknown_route_uses_envelope(client: TestClient, auth: dict[str, str]) -> None:
    assert_error(client.get("/v1/nothing-here", headers=auth), 404, "not_found")


def test_upload_must_be_multipart(client: TestClient, auth: dict[str, str]) -> None:
    response = client.post("/v1/datasets", headers=auth, content=b"{}")
    assert_error(response, 415, "unsupported_media_type")


def test_upload_without_file_field(client: TestClient, auth: dict[str, str]) -> None:
    response = client.post(
        "/v1/datasets", headers=auth, data={"name": "x"}, files={"other": ("a", b"1")}
    )
    assert_error(response, 422, "missing_file", "file")


def test_upload_over_cap_is_413_and_leaves_nothing(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    context.settings.max_upload_bytes = 10_000
    response = client.post("/v1/datasets", headers=auth, files={"file": ("big.zip", b"0" * 20_000)})
    assert_error(response, 413, "upload_too_large", "file")
    assert client.get("/v1/datasets", headers=auth).json()["data"] == []
    assert list(Path(context.scratch_dir).iterdir()) == []


def test_dataset_reports_skipped_files_and_counts(
    client: TestClient, context: AppContext, auth: dict[str, str], tmp_path: Path
) -> None:
    pool, _ = digits_split()
    # 16 zeros and 4 ones: imbalanced (12 against 3 in training).
    good = [item for item in pool if item[1] == 0][:16] + [item for item in pool if item[1] == 1][
        :4
    ]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for index, (image, label) in enumerate(good):
            archive.writestr(f"d/{label}/{index}.png", png_bytes(image))
        archive.writestr("d/0/broken.png", png_bytes(good[0][0])[:-40])
        archive.writestr("../escape.png", png_bytes(good[0][0]))
        archive.writestr("d/1/notes.png", b"this is text, not an image")
    dataset = upload(client, auth, buffer.getvalue(), name="two-digits", val_fraction="0.25")
    assert dataset["status"] == "processing"
    process_upload(context=context, dataset_id=dataset["id"])
    shown = client.get(f"/v1/datasets/{dataset['id']}", headers=auth).json()
    assert shown["status"] == "ready"
    assert shown["name"] == "two-digits"
    assert shown["classes"] == ["0", "1"]
    assert shown["num_images"] == 20
    counts = shown["class_counts"]
    assert sum(c["total"] for c in counts.values()) == 20
    assert all(c["val"] >= 1 and c["train"] >= 1 for c in counts.values())
    imbalance = shown["imbalance"]
    assert imbalance["imbalanced"] is True
    assert imbalance["largest"] == {"label": "0", "train": counts["0"]["train"]}
    assert imbalance["smallest"] == {"label": "1", "train": counts["1"]["train"]}
    assert imbalance["ratio"] == counts["0"]["train"] / counts["1"]["train"] > 3
    assert 'sampler: "balanced"' in imbalance["suggestion"]
    skipped = {s["path"]: s for s in shown["skipped"]}
    assert skipped["d/0/broken.png"]["code"] == "corrupt_image"
    assert skipped["../escape.png"]["code"] == "unsafe_path"
    assert skipped["d/1/notes.png"]["code"] == "not_an_image"
    assert not (context.settings.resolved_storage_dir / "datasets" / "escape.png").exists()
    assert not any(p.name == "escape.png" for p in context.settings.data_dir.rglob("*"))
    assert not context.store.exists(f"uploads/{dataset['id']}/archive")


def test_imbalance_report_numbers_and_the_remedy_per_modality() -> None:
    def counts(**train: int) -> dict[str, dict[str, int]]:
        return {label: {"train": n, "val": 0, "total": n} for label, n in train.items()}

    balanced = imbalance_report(counts(a=30, b=10), "image")
    assert balanced is not None
    assert balanced["imbalanced"] is False
    assert balanced["ratio"] == 3.0
    assert balanced["suggestion"] is None
    text = imbalance_report(counts(a=31, b=10), "text")
    assert text is not None
    assert text["imbalanced"] is True
    assert "class_weights" in text["suggestion"]
    assert 'sampler: "balanced"' not in text["suggestion"]
    empty_class = imbalance_report(counts(a=5, b=0), "image")
    assert empty_class is not None
    assert (empty_class["imbalanced"], empty_class["ratio"]) == (True, None)
    assert imbalance_report(counts(a=5), "image") is None


def test_bad_archive_fails_with_reason(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    # Looks like an archive by its first bytes, so it is accepted and fails when read.
    dataset = upload(client, auth, b"PK\x03\x04" + b"\x00" * 100)
    process_upload(context=context, dataset_id=dataset["id"])
    shown = client.get(f"/v1/datasets/{dataset['id']}", headers=auth).json()
    assert shown["status"] == "failed"
    assert shown["error_code"] == "corrupt_archive"


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"epochs": 0}, "epochs"),
        ({"lr": -1}, "lr"),
        ({"strategy": "magic"}, "strategy"),
        ({"head": {"hidden": [256], "dropout": 1.5}}, "head.dropout"),
        ({"model": "Has Spaces"}, "model"),
        ({"surprise": 1}, "surprise"),
        ({"image_size": 4}, "image_size"),
    ],
)
def test_spec_errors_name_the_field(
    client: TestClient, auth: dict[str, str], change: dict[str, Any], param: str
) -> None:
    response = client.post("/v1/jobs", headers=auth, json=small_spec("ds_x", **change))
    assert_error(response, 422, "invalid_request", param)


def test_json_types_are_strict_and_bodies_and_errors_bounded(
    client: TestClient, auth: dict[str, str]
) -> None:
    # `true` is no integer, nor `"2"`: on every route that takes a spec, and in an
    # experiment's nested settings and budget.
    for path in ("/v1/jobs/plan", "/v1/jobs", "/v1/jobs/lr-find"):
        for wrong in (True, "2", 2.0):
            response = client.post(path, headers=auth, json=small_spec("ds_x", epochs=wrong))
            assert_error(response, 422, "invalid_request", "epochs")
    experiment = {"dataset": "ds_x", "model": "m", "base_models": ["efficientnet_lite0"]}
    for change, param in (
        ({"settings": {"epochs": True}}, "settings.epochs"),
        ({"budget": {"max_parallel": True}}, "budget.max_parallel"),
        ({"test_seed": 2**63}, "test_seed"),
        ({"seeds": [2**70]}, "seeds.0"),
    ):
        response = client.post("/v1/experiments", headers=auth, json={**experiment, **change})
        assert_error(response, 422, "invalid_request", param)

    # A long id is quoted by a short, escaped prefix, not sent back whole.
    long_id = "ds_" + "\u202e" * 300_000
    missing = client.post("/v1/jobs/plan", headers=auth, json=small_spec(long_id))
    error = assert_error(missing, 404, "dataset_not_found", "dataset")
    assert len(missing.content) < 1000
    assert "(300003 characters)" in error["message"]

    # A 422 lists a few problems and counts the rest.
    unknown = {f"key_{index}": index for index in range(20_000)}
    flooded = client.post("/v1/jobs/plan", headers=auth, json={**small_spec("ds_x"), **unknown})
    error = assert_error(flooded, 422, "invalid_request", "key_0")
    assert len(error["details"]) == 5
    assert error["more_details"] == 19_995
    assert len(flooded.content) < 2000

    # Over the JSON body cap: refused on its declared length, and while it streams in.
    cap = client.app.state.context.settings.max_json_body_bytes  # type: ignore[attr-defined]
    declared = client.post(
        "/v1/jobs/plan",
        headers={**auth, "Content-Type": "application/json"},
        content=b" " * (cap + 1),
    )
    assert_error(declared, 413, "payload_too_large")

    def chunks() -> Any:
        yield b'{"dataset": "'
        for _ in range(cap // 65536 + 1):
            yield b"x" * 65536
        yield b'"}'

    streamed = client.post(
        "/v1/experiments", headers={**auth, "Content-Type": "application/json"}, content=chunks()
    )
    assert_error(streamed, 413, "payload_too_large")


def test_engine_rules_name_the_field(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    dataset_id = ready_dataset(client, context, auth)
    spec = small_spec(dataset_id, strategy="fine_tune", head_epochs=2)
    response = client.post("/v1/jobs", headers=auth, json=spec)
    assert_error(response, 422, "invalid_spec", "head_epochs")
    # The field comes with the engine's error, not from its message's first word.
    too_short = small_spec(dataset_id, strategy="freeze_unfreeze", epochs=1)
    error = assert_error(client.post("/v1/jobs", headers=auth, json=too_short), 422, "invalid_spec")
    assert (error["param"], error["message"].split(" ")[0]) == ("epochs", "freeze_unfreeze")


def test_job_needs_a_ready_dataset(client: TestClient, auth: dict[str, str]) -> None:
    pool, _ = digits_split()
    dataset = upload(client, auth, zip_of_classes(pool[:30]))
    response = client.post("/v1/jobs", headers=auth, json=small_spec(dataset["id"]))
    assert_error(response, 409, "dataset_not_ready", "dataset")
    missing = client.post("/v1/jobs", headers=auth, json=small_spec("ds_missing"))
    assert_error(missing, 404, "dataset_not_found", "dataset")


def test_zoo_and_weights_availability(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    zoo = {m["name"]: m for m in client.get("/v1/base-models", headers=auth).json()["data"]}
    assert zoo["efficientnet_lite0"]["weights_available"] is True
    assert zoo["efficientnet_lite0"]["mean"] == [0.498, 0.498, 0.498]
    assert zoo["resnet50"]["weights_available"] is False
    assert [g["name"] for g in zoo["resnet18"]["groups"]][:2] == ["stem", "layer1"]
    dataset_id = ready_dataset(client, context, auth)
    response = client.post(
        "/v1/jobs", headers=auth, json=small_spec(dataset_id, base_model="resnet50")
    )
    error = assert_error(response, 422, "weights_unavailable", "base_model")
    assert "pretrained" in error["message"]
    scratch = client.post(
        "/v1/jobs/plan",
        headers=auth,
        json=small_spec(dataset_id, base_model="resnet50", pretrained=False),
    )
    assert scratch.status_code == 200, scratch.text
    unknown = client.post(
        "/v1/jobs", headers=auth, json=small_spec(dataset_id, base_model="alexnet9")
    )
    assert_error(unknown, 422, "unknown_base_model", "base_model")


def test_plan_preview_lists_stages_and_parameters(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    dataset_id = ready_dataset(client, context, auth)
    spec = small_spec(dataset_id, strategy="freeze_unfreeze", epochs=3, head={"hidden": [32]})
    preview = client.post("/v1/jobs/plan", headers=auth, json=spec).json()
    head, unfreeze = preview["stages"]
    assert preview["num_classes"] == 3
    assert head["cache_features"] is True
    # An image stage shows its own modality's inputs, not a text stage's as nulls.
    assert "image_size" in head
    assert {"max_length", "objective"}.isdisjoint(head)
    assert [g["name"] for g in head["trainable_groups"]] == ["head"]
    assert head["trainable_parameters"] < unfreeze["trainable_parameters"]
    assert unfreeze["trainable_parameters"] == unfreeze["total_parameters"]
    assert head["epochs"] + unfreeze["epochs"] == 3
    rates = [g["lr"] for g in unfreeze["trainable_groups"]]
    assert rates == sorted(rates), "lower groups train with lower rates"
    assert (head["augment"], head["feature_views"], unfreeze["feature_views"]) == ("none", 1, None)
    augmented = client.post(
        "/v1/jobs/plan", headers=auth, json={**spec, "augment": "light", "feature_views": 3}
    ).json()
    assert [(stage["augment"], stage["feature_views"]) for stage in augmented["stages"]] == [
        ("light", 3),
        ("light", None),
    ]
    assert client.get("/v1/jobs", headers=auth).json()["data"] == [], "a preview creates no job"
    # The recipe per stage: the resolved top rate, augmentation, the weight average, TTA.
    assert (head["lr"], unfreeze["lr"]) == (0.01, max(rates))
    assert (head["augment"], head["ema"], head["tta"]) == ("none", None, None)
    assert unfreeze["tta"] == ["original"]
    recipe = {"augment": "light", "tta": "flip", "ema": 0.99}
    head, unfreeze = client.post("/v1/jobs/plan", headers=auth, json={**spec, **recipe}).json()[
        "stages"
    ]
    # The cached head stage is augmented through its `feature_views` views.
    assert (head["augment"], head["ema"], head["tta"]) == ("light", 0.99, None)
    assert (unfreeze["augment"], unfreeze["ema"]) == ("light", 0.99)
    assert unfreeze["tta"] == ["original", "flip"]
    mirrorless = client.post("/v1/jobs/plan", headers=auth, json={**spec, **recipe, "flip": False})
    assert_error(mirrorless, 422, "invalid_spec", "tta")
    job = client.post("/v1/jobs", headers=auth, json={**spec, **recipe}).json()
    signed_in = {"Cookie": f"thaw_key={auth['Authorization'].removeprefix('Bearer ')}"}
    page = client.get(f"/ui/jobs/{job['id']}", headers=signed_in).text
    assert "<td>light</td>" in page
    assert "Weight average (EMA): decay 0.99" in page
    assert "test-time augmentation: original, flip" in page


@pytest.mark.on_postgres_too
def test_cancel_queued_job_never_starts(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    dataset_id = ready_dataset(client, context, auth)
    job = client.post("/v1/jobs", headers=auth, json=small_spec(dataset_id)).json()
    assert job["status"] == "queued"
    assert job["queue"] == "cpu"
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth).json()
    assert cancelled["status"] == "cancelled"
    jobs.execute(context, job_id=job["id"])  # the task message arrives after the cancel
    shown = client.get(f"/v1/jobs/{job['id']}", headers=auth).json()
    assert shown["status"] == "cancelled"
    assert shown["attempt"] == 0
    again = client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
    assert_error(again, 409, "job_not_cancellable")
    statuses = [
        e["data"]["status"]
        for e in client.get(f"/v1/jobs/{job['id']}/events", headers=auth).json()["data"]
    ]
    assert statuses == ["queued", "cancelled"]


def test_a_plan_shows_its_modalitys_preprocessing_even_when_stored_flat(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    from service.tables import Job

    dataset_id = ready_dataset(client, context, auth)
    preview = client.post("/v1/jobs/plan", headers=auth, json=small_spec(dataset_id)).json()
    expected = {"modality": "image", "mean": [0.498] * 3, "std": [0.502] * 3}
    assert preview["plan"]["preprocessing"] == expected
    assert not {"mean", "std", "max_length", "truncation"} & set(preview["plan"])
    assert [stage["image_size"] for stage in preview["stages"]] == [64]
    assert [stage["reads"] for stage in preview["stages"]] == ["64 px images"]
    assert not {"max_length", "objective"} & set(preview["stages"][0])
    job = client.post("/v1/jobs", headers=auth, json=small_spec(dataset_id)).json()
    assert job["plan"]["preprocessing"] == expected
    # A job stored before `preprocessing` was one field: its plan has the flat fields.
    flat = {name: value for name, value in job["plan"].items() if name != "preprocessing"}
    flat |= {"mean": expected["mean"], "std": expected["std"], "max_length": None}
    flat |= {"truncation": None}
    with context.db.session() as session:
        session.get_one(Job, job["id"]).plan = flat
        session.commit()
    shown = client.get(f"/v1/jobs/{job['id']}", headers=auth).json()
    assert shown["plan"] == job["plan"]
    listed = client.get("/v1/jobs", headers=auth).json()["data"]
    assert [entry["plan"] for entry in listed] == [job["plan"]]


@pytest.mark.on_postgres_too
def test_two_deliveries_at_once_claim_the_job_once(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    """A redelivered task message racing the first: both are released together, and only one
    of them may move the job from queued to running."""
    dataset_id = ready_dataset(client, context, auth, classes=2, per_class=8)
    job = client.post("/v1/jobs", headers=auth, json=small_spec(dataset_id, epochs=1)).json()
    together = threading.Barrier(2)
    failures: list[BaseException] = []

    def deliver() -> None:
        together.wait()
        try:
            jobs.execute(context, job_id=job["id"])
        except BaseException as exc:  # surfaced below: a thread's exception is lost otherwise
            failures.append(exc)

    deliveries = [threading.Thread(target=deliver) for _ in range(2)]
    for delivery in deliveries:
        delivery.start()
    for delivery in deliveries:
        delivery.join()
    assert failures == []
    shown = client.get(f"/v1/jobs/{job['id']}", headers=auth).json()
    assert (shown["status"], shown["attempt"]) == ("succeeded", 1), shown
    events = client.get(f"/v1/jobs/{job['id']}/events", headers=auth).json()["data"]
    claims = [e for e in events if e["kind"] == "status" and e["data"]["status"] == "running"]
    assert len(claims) == 1, claims
    assert len(client.get("/v1/models/digits/versions", headers=auth).json()["data"]) == 1


@pytest.mark.on_postgres_too
def test_idempotency_key_returns_the_same_job(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    dataset_id = ready_dataset(client, context, auth)
    headers = {**auth, "Idempotency-Key": "retry-1"}
    first = client.post("/v1/jobs", headers=headers, json=small_spec(dataset_id))
    second = client.post("/v1/jobs", headers=headers, json=small_spec(dataset_id))
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["id"] == second.json()["id"]
    assert len(client.get("/v1/jobs", headers=auth).json()["data"]) == 1


def test_cuda_jobs_go_to_the_gpu_queue(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    dataset_id = ready_dataset(client, context, auth)
    answer = client.post("/v1/jobs", headers=auth, json=small_spec(dataset_id, device="cuda"))
    if this_host_has_cuda():
        assert answer.json()["queue"] == "gpu"
    else:
        # The embedded default's workers run here; a fleet queues it (tests/fleet/test_queues).
        assert_error(answer, 422, "no_gpu_worker", "device")


def test_pagination(client: TestClient, context: AppContext, auth: dict[str, str]) -> None:
    pool, _ = digits_split()
    made = [upload(client, auth, zip_of_classes(pool[:10]), name=f"d{i}")["id"] for i in range(3)]
    first = client.get("/v1/datasets?limit=2", headers=auth).json()
    assert [d["id"] for d in first["data"]] == made[:2]
    assert first["has_more"] is True
    second = client.get(f"/v1/datasets?limit=2&after={first['last_id']}", headers=auth).json()
    assert [d["id"] for d in second["data"]] == made[2:]
    assert second["has_more"] is False
    assert_error(client.get("/v1/datasets?limit=0", headers=auth), 422, "invalid_request", "limit")


@pytest.mark.on_postgres_too
@pytest.mark.onnx_export
def test_train_publish_predict_and_tenant_isolation(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    dataset_id = ready_dataset(client, context, auth)
    job = client.post("/v1/jobs", headers=auth, json=small_spec(dataset_id)).json()
    jobs.execute(context, job_id=job["id"])
    done = client.get(f"/v1/jobs/{job['id']}", headers=auth).json()
    assert done["status"] == "succeeded", done
    assert done["progress"] == 1.0
    events = client.get(f"/v1/jobs/{job['id']}/events", headers=auth).json()["data"]
    epochs = [e["data"] for e in events if e["kind"] == "epoch"]
    assert len(epochs) == 2
    for field in (
        "stage",
        "epoch",
        "train_loss",
        "val_loss",
        "val_accuracy",
        "learning_rates",
        "seconds",
    ):
        assert field in epochs[0]

    history = client.get(f"/v1/jobs/{job['id']}/metrics", headers=auth).json()["epochs"]
    assert history == epochs
    # The checkpoint exists only while the job trains; a finished job has none left.
    assert client.get(f"/v1/jobs/{job['id']}/checkpoints", headers=auth).json() == []

    version = client.get("/v1/models/digits/versions/1", headers=auth).json()
    assert version["job_id"] == job["id"]
    assert version["dataset_id"] == dataset_id
    assert version["labels"] == ["digit_0", "digit_1", "digit_2"]
    metrics = version["metrics"]
    # The accuracy is what the confusion matrix over the whole validation split says, and it
    # is one the epochs reported.
    confusion = metrics["confusion_matrix"]
    assert [len(row) for row in confusion] == [3, 3, 3]
    counts = client.get(f"/v1/datasets/{dataset_id}", headers=auth).json()["class_counts"]
    val_images = sum(c["val"] for c in counts.values())
    assert sum(map(sum, confusion)) == val_images
    correct = sum(confusion[i][i] for i in range(3))
    assert metrics["val_accuracy"] == pytest.approx(correct / val_images)
    reported = [e["val_accuracy"] for e in epochs]
    assert any(metrics["val_accuracy"] == pytest.approx(r) for r in reported), reported
    assert {c["label"] for c in metrics["per_class"]} == set(version["labels"])
    assert {a["name"] for a in version["artifacts"]} == {
        "weights.safetensors",
        "config.json",
        "labels.json",
        "card.md",
        "model.onnx",
    }
    config = client.get("/v1/models/digits/versions/1/artifacts/config.json", headers=auth).json()
    assert config["preprocessing"]["image_size"] == 64
    assert config["labels"] == version["labels"]

    _pool, held_out = digits_split()
    image = png_bytes(held_out[0][0])
    predicted = client.post(
        "/v1/models/digits/versions/1/predict",
        headers=auth,
        files=[("images", ("a.png", image)), ("images", ("bad.png", b"nope"))],
        data={"top_k": "2"},
    )
    assert predicted.status_code == 200, predicted.text
    good, bad = predicted.json()["predictions"]
    assert good["image"] == "a.png"
    assert len(good["top"]) == 2
    assert bad["image"] == "bad.png"
    assert bad["error"]["code"] == "not_an_image"

    other = new_key(context, "team-b")
    for path in (
        f"/v1/datasets/{dataset_id}",
        f"/v1/jobs/{job['id']}",
        f"/v1/jobs/{job['id']}/events",
        "/v1/models/digits",
        "/v1/models/digits/versions",
        "/v1/models/digits/versions/1",
        "/v1/models/digits/versions/1/artifacts/config.json",
    ):
        response = client.get(path, headers=other)
        assert response.status_code == 404, (path, response.text)
        assert "digit_0" not in response.text
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=other).status_code == 404
    stolen = client.post(
        "/v1/models/digits/versions/1/predict", headers=other, files=[("images", ("a.png", image))]
    )
    assert stolen.status_code == 404
    foreign_job = client.post("/v1/jobs", headers=other, json=small_spec(dataset_id))
    assert_error(foreign_job, 404, "dataset_not_found", "dataset")
    assert client.get("/v1/models", headers=other).json()["data"] == []
    assert client.get("/v1/jobs", headers=other).json()["data"] == []


@pytest.mark.on_postgres_too
def test_checkpoints_lists_the_saved_checkpoint(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    dataset_id = ready_dataset(client, context, auth)
    job = client.post("/v1/jobs", headers=auth, json=small_spec(dataset_id)).json()
    assert client.get(f"/v1/jobs/{job['id']}/checkpoints", headers=auth).json() == []
    context.store.put_bytes(f"jobs/{job['id']}/checkpoint.pt", b"x" * 10)
    (saved,) = client.get(f"/v1/jobs/{job['id']}/checkpoints", headers=auth).json()
    assert (saved["name"], saved["size"]) == ("checkpoint.pt", 10)
