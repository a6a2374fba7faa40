"""Experiments over HTTP on digits (and on texts): trials run as ordinary jobs by an in-process
worker, a complete leaderboard, a test split no trial trains or selects on, the diagnosis,
promote."""

import csv
import dataclasses
import io
import json
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

import worker.jobs.training
from service.context import AppContext
from service.datasets.ingest import iter_text_rows
from service.datasets.service import load_manifest, process_upload
from service.db import utcnow
from service.experiments.service import advance
from service.jobs import transitions
from service.jobs.reaper import reap
from service.jobs.service import record_event
from service.tables import Experiment, Job
from tests.conftest import new_key
from tests.test_api import assert_error, small_spec
from tests.test_strategies_api import digits_dataset, train
from tests.test_text_e2e import FIXTURE as DEBIAN_DESCRIPTIONS
from worker import engine, jobs

STRATEGIES = ["scratch", "feature_extraction", "freeze_unfreeze", "fine_tune"]


def experiment_request(dataset: str, **overrides: Any) -> dict[str, Any]:
    request = {
        "dataset": dataset,
        "model": "digits-exp",
        "base_models": ["efficientnet_lite0"],
        "strategies": STRATEGIES,
        "settings": {
            "epochs": 2,
            "batch_size": 16,
            "lr": 0.01,
            "image_size": 64,
            "seed": 1,
            # Every trial runs both epochs (a solved head stage would take one).
            "solve_head": False,
        },
        "test_fraction": 0.25,
        "test_seed": 3,
        "budget": {"max_parallel": 2},
    }
    return {**request, **overrides}


def run_trials(
    client: TestClient, context: AppContext, auth: dict[str, str], experiment: dict[str, Any]
) -> dict[str, Any]:
    """Be the worker: run whatever trial is queued, until the experiment ends."""
    for _ in range(len(experiment["trials"]) + 1):
        waiting = queued_trial_jobs(context, experiment)
        if not waiting:
            break
        jobs.execute(context, job_id=waiting[0])
        experiment = client.get(f"/v1/experiments/{experiment['id']}", headers=auth).json()
    return experiment


def queued_trial_jobs(context: AppContext, experiment: dict[str, Any]) -> list[str]:
    with context.db.session() as session:
        return [
            t["job_id"]
            for t in experiment["trials"]
            if t["job_id"] and session.get_one(Job, t["job_id"]).status == "queued"
        ]


def test_an_experiment_runs_scores_diagnoses_and_promotes(
    client: TestClient,
    context: AppContext,
    auth: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dataset = digits_dataset(client, context, auth, [0, 1, 2])
    trained_on: dict[str, set[str]] = {}
    real_run = worker.jobs.training.run

    def recording_run(plan: Any, *, train: list[Any], val: list[Any], **rest: Any) -> Any:
        trained_on[plan.extra["strategy"]] = {str(s.path) for s in [*train, *val]}
        return real_run(plan, train=train, val=val, **rest)

    monkeypatch.setattr(worker.jobs.training, "run", recording_run)

    created = client.post("/v1/experiments", headers=auth, json=experiment_request(dataset))
    assert created.status_code == 201, created.text
    experiment = created.json()
    exp_id = experiment["id"]
    assert experiment["status"] == "running"
    assert [t["strategy"] for t in experiment["trials"]] == STRATEGIES
    # The budget: two trials at once, the rest wait for room.
    assert [t["status"] for t in experiment["trials"]] == ["queued", "queued", "pending", "pending"]

    experiment = run_trials(client, context, auth, experiment)
    assert experiment["status"] == "succeeded", experiment["trials"]

    # The test split: disjoint from what every trial trained and validated on, and together
    # with it the whole dataset.
    split = client.get(f"/v1/experiments/{exp_id}/test-split", headers=auth).json()["items"]
    manifest, root = load_manifest(context=context, dataset_id=dataset)
    test_paths = {str(root / item) for item in split}
    everything = {str(root / s.path) for s in manifest.samples}
    assert len(split) == experiment["test_size"] >= 9  # a quarter of 45, per class and split
    assert set(trained_on) == set(STRATEGIES)
    for strategy, seen in trained_on.items():
        assert not seen & test_paths, strategy
        assert seen | test_paths == everything, strategy

    board = experiment["leaderboard"]
    assert len(board) == len(STRATEGIES)
    assert {row["strategy"] for row in board} == set(STRATEGIES)
    accuracies = [row["test_accuracy"] for row in board]
    assert accuracies == sorted(accuracies, reverse=True)
    assert [row["rank"] for row in board] == [1, 2, 3, 4]
    for row in board:
        assert row["status"] == "succeeded"
        low, high = row["test_accuracy_interval"]
        assert 0.0 <= low <= row["test_accuracy"] <= high <= 1.0
        # A confident model's float32 probabilities can round to exactly 1 on every item, so
        # the loss may be 0; with any item wrong it cannot be.
        assert row["test_loss"] >= 0
        assert row["test_accuracy"] == 1.0 or row["test_loss"] > 0
        assert 0.0 <= row["test_macro_f1"] <= 1.0
        assert row["val_accuracy"] is not None
        assert row["val_loss"] is not None
        assert row["epochs_run"] == 2
        assert row["epochs_to_best"] in (1, 2)
        assert row["wall_seconds"] > 0
        assert row["latency_ms_per_item"] > 0
        assert 0 < row["trainable_parameters"] <= row["total_parameters"]
        assert row["artifact_bytes"] > 0
        # No parent model, so no old task to keep.
        assert row["old_task_accuracy"] is None
        assert row["old_task_change"] is None
        version = client.get(
            f"/v1/models/digits-exp/versions/{row['version']}", headers=auth
        ).json()
        assert {f"experiment:{exp_id}", f"trial:{row['trial_id']}"} <= set(version["tags"])
        assert version["metrics"]["test_items"] == len(split)
    by_strategy = {row["strategy"]: row for row in board}
    # Feature extraction trains the head alone; scratch trains everything.
    assert (
        by_strategy["feature_extraction"]["trainable_parameters"]
        < by_strategy["scratch"]["trainable_parameters"]
        == by_strategy["scratch"]["total_parameters"]
    )
    assert sorted(row["version"] for row in board) == [1, 2, 3, 4]

    diagnosis = experiment["diagnosis"]
    (base,) = diagnosis["base_models"]
    assert base["base_model"] == "efficientnet_lite0"
    assert {c["strategy"] for c in base["comparisons"]} == set(STRATEGIES) - {"scratch"}
    for comparison in base["comparisons"]:
        assert comparison["asymptote"]["test_items"] == len(split)
        assert set(comparison["start"]) == {"transfer", "scratch", "difference"}
        assert comparison["slope"]["area_under_val_curve"]["epochs"] == 2
    assert len(diagnosis["summary"]) >= 3 * 3

    plot = client.get(f"/v1/experiments/{exp_id}/plots/curves.svg", headers=auth)
    assert plot.headers["content-type"] == "image/svg+xml"
    for strategy in STRATEGIES:
        assert f"efficientnet_lite0/{strategy}" in plot.text
    assert "stroke-dasharray" in plot.text  # scratch, dashed

    kinds = [
        (e["kind"], e["data"].get("status"))
        for e in client.get(f"/v1/experiments/{exp_id}/events", headers=auth).json()["data"]
    ]
    # The live stream replays the same events, then ends after the terminal one.
    stream = client.get(f"/v1/experiments/{exp_id}/events/stream", headers=auth)
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert stream.text.count("\nevent: trial\n") == 8
    last = [line for line in stream.text.splitlines() if line.startswith("data: ")][-1]
    assert json.loads(last.removeprefix("data: "))["data"] == {"status": "succeeded"}
    assert kinds[0] == ("status", "running")
    assert kinds[-1] == ("status", "succeeded")
    assert kinds.count(("trial", "started")) == 4
    assert kinds.count(("trial", "succeeded")) == 4

    # Promote: a chosen trial first, then the leader (the default) moves the alias.
    last = board[-1]
    promoted = client.post(
        f"/v1/experiments/{exp_id}/promote", headers=auth, json={"trial": last["trial_id"]}
    )
    assert promoted.status_code == 200, promoted.text
    production = client.get("/v1/models/digits-exp/versions/production", headers=auth).json()
    assert production["version"] == last["version"]
    leader = client.post(f"/v1/experiments/{exp_id}/promote", headers=auth)
    assert leader.json() == {
        "experiment_id": exp_id,
        "trial_id": board[0]["trial_id"],
        "model": "digits-exp",
        "alias": "production",
        "version": board[0]["version"],
        "test_accuracy": board[0]["test_accuracy"],
    }
    production = client.get("/v1/models/digits-exp/versions/production", headers=auth).json()
    assert production["version"] == board[0]["version"]

    assert_error(
        client.post(f"/v1/experiments/{exp_id}/promote", headers=auth, json={"trial": "trl_x"}),
        404,
        "trial_not_found",
        "trial",
    )
    assert_error(
        client.post(f"/v1/experiments/{exp_id}/cancel", headers=auth),
        409,
        "experiment_not_cancellable",
    )
    listed = client.get("/v1/experiments?limit=1", headers=auth).json()
    assert [e["id"] for e in listed["data"]] == [exp_id]
    assert listed["has_more"] is False


def test_an_experiment_from_a_registered_model_shows_the_old_task_kept_or_lost(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    """The literature's old-task column on the user's data: a parent trained on digits 0-2, an
    experiment on 3-5 from it; `lwf` keeps the old task, `freeze_unfreeze` loses some of it.
    Both train the new head alone first, then everything: the same recipe but for `lwf`'s
    distillation, so the distillation is what must keep the old task (`fine_tune`, without the
    head-only warm-up, would lose to `lwf` even with its distillation weight at 0)."""
    # 40 digits a class: the old task is judged on its 24 validation digits, not a handful.
    old_data = digits_dataset(client, context, auth, [0, 1, 2], per_label=40)
    train(client, context, auth, small_spec(old_data, model="old", epochs=4))
    new_data = digits_dataset(client, context, auth, [3, 4, 5])
    request = experiment_request(
        new_data,
        base_models=["model:old:1"],
        strategies=["lwf", "freeze_unfreeze"],
        # Stepped heads: with solved ones LwF kept less of the old task than plain
        # freeze_unfreeze (-0.625 against -0.375), an open question noted on issue 24.
        settings={
            "epochs": 3,
            "batch_size": 8,
            "lr": 0.01,
            "image_size": 64,
            "seed": 1,
            "solve_head": False,
            # One run each, as the docstring's comparison: with the default refit on this small
            # set, lwf and freeze_unfreeze lost the same (-0.042 each), not yet understood.
            "refit": False,
        },
    )
    created = client.post("/v1/experiments", headers=auth, json=request)
    assert created.status_code == 201, created.text
    experiment = run_trials(client, context, auth, created.json())
    assert experiment["status"] == "succeeded", experiment["trials"]

    rows = {row["strategy"]: row for row in experiment["leaderboard"]}
    parent_accuracy = set()
    for row in rows.values():
        assert 0.0 <= row["old_task_accuracy"] <= 1.0
        parent_accuracy.add(round(row["old_task_accuracy"] - row["old_task_change"], 9))
        version = client.get(f"/v1/models/digits-exp/versions/{row['version']}", headers=auth)
        assert version.json()["metrics"]["old_task_items"] > 0
    # Both trials were judged against the same parent on the same items, and it had learned.
    (parent,) = parent_accuracy
    assert parent >= 0.7
    lwf, tuned = rows["lwf"], rows["freeze_unfreeze"]
    print(
        f"old task: parent {parent:.3f}, lwf {lwf['old_task_accuracy']:.3f}, "
        f"freeze_unfreeze {tuned['old_task_accuracy']:.3f}"
    )
    assert lwf["old_task_change"] > tuned["old_task_change"]


def test_cancel_stops_every_trial_and_bad_requests_are_refused(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    dataset = digits_dataset(client, context, auth, [0, 1])
    request = experiment_request(dataset, budget={"max_parallel": 1})
    experiment = client.post("/v1/experiments", headers=auth, json=request).json()
    assert [t["status"] for t in experiment["trials"]] == ["queued"] + ["pending"] * 3
    cancelled = client.post(f"/v1/experiments/{experiment['id']}/cancel", headers=auth).json()
    assert cancelled["status"] == "cancelled"
    assert [t["status"] for t in cancelled["trials"]] == ["cancelled"] + ["not_started"] * 3
    assert cancelled["trials"][1]["reason"] == "the experiment was cancelled"
    assert cancelled["diagnosis"]["base_models"] == []

    def refused(status: int, code: str, param: str | None, **changes: Any) -> None:
        answer = client.post("/v1/experiments", headers=auth, json={**request, **changes})
        assert_error(answer, status, code, param)

    refused(404, "dataset_not_found", "dataset", dataset="ds_missing")
    refused(422, "unknown_base_model", "base_models", base_models=["no_such_net"])
    refused(422, "invalid_request", None, strategies=["scratch", "scratch"])
    refused(422, "invalid_request", None, settings={"base_model": "resnet18"})
    refused(422, "invalid_request", None, settings={"epochs": 0})
    refused(422, "invalid_request", None, strategies=["no_such_strategy"])
    assert_error(
        client.get("/v1/experiments/exp_missing", headers=auth),
        404,
        "experiment_not_found",
        "experiment",
    )
    other_team = new_key(context, "team-b")
    assert_error(
        client.get(f"/v1/experiments/{experiment['id']}", headers=other_team),
        404,
        "experiment_not_found",
    )
    assert client.get("/v1/experiments", headers=other_team).json()["data"] == []


def test_trials_not_started_by_the_deadline_are_said_so(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    dataset = digits_dataset(client, context, auth, [0, 1])
    request = experiment_request(dataset, budget={"max_parallel": 1, "deadline_seconds": 600})
    experiment = client.post("/v1/experiments", headers=auth, json=request).json()
    first_job = experiment["trials"][0]["job_id"]
    with context.db.session() as session:
        # The first trial's job may not outlive the experiment's deadline.
        assert session.get_one(Job, first_job).max_runtime_seconds <= 600
        session.get_one(Experiment, experiment["id"]).deadline_at = utcnow() - timedelta(1)
        session.commit()
    advance(context, experiment_id=experiment["id"])
    after = client.get(f"/v1/experiments/{experiment['id']}", headers=auth).json()
    assert [t["status"] for t in after["trials"]] == ["queued"] + ["not_started"] * 3
    assert after["trials"][3]["reason"] == "the experiment's deadline passed before it started"
    assert after["status"] == "running"  # until its one started trial ends


def test_a_trial_cancelled_directly_frees_its_place_on_the_reaper_pass(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    dataset = digits_dataset(client, context, auth, [0, 1])
    request = experiment_request(dataset, budget={"max_parallel": 1})
    experiment = client.post("/v1/experiments", headers=auth, json=request).json()
    first = experiment["trials"][0]["job_id"]
    assert client.post(f"/v1/jobs/{first}/cancel", headers=auth).json()["status"] == "cancelled"
    reap(context)
    after = client.get(f"/v1/experiments/{experiment['id']}", headers=auth).json()
    assert [t["status"] for t in after["trials"]] == ["cancelled", "queued", "pending", "pending"]
    events = client.get(f"/v1/experiments/{experiment['id']}/events", headers=auth).json()
    assert {"trial_id": after["trials"][0]["id"], "status": "cancelled", "job_id": first} in [
        e["data"] for e in events["data"]
    ]
    reap(context)  # a second pass changes nothing: each trial's end is noted once
    again = client.get(f"/v1/experiments/{experiment['id']}/events", headers=auth).json()
    assert len(again["data"]) == len(events["data"])


def test_successive_halving_prunes_a_lagging_trial_and_shows_it(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    dataset = digits_dataset(client, context, auth, [0, 1])
    request = experiment_request(dataset, budget={"max_parallel": 4, "prune": True})
    experiment = client.post("/v1/experiments", headers=auth, json=request).json()
    first_epoch = {"scratch": 0.3, "feature_extraction": 0.9, "freeze_unfreeze": 0.8}
    first_epoch["fine_tune"] = 0.2
    with context.db.session() as session:
        # Four workers each finished epoch 1 (as their hooks record it).
        for trial in experiment["trials"]:
            job = transitions.claim(
                session, job_id=trial["job_id"], owner="test", lease=timedelta(minutes=5)
            )
            record_event(
                session,
                job=job,
                kind="epoch",
                data={
                    "global_epoch": 1,
                    "val_accuracy": first_epoch[trial["strategy"]],
                    "val_loss": 1.0,
                    "train_loss": 1.0,
                },
            )
        session.commit()
    advance(context, experiment_id=experiment["id"])
    after = client.get(f"/v1/experiments/{experiment['id']}", headers=auth).json()
    status = {t["strategy"]: t["status"] for t in after["trials"]}
    # Top half at epoch 1 is 0.9 and 0.8; scratch (0.3) is the baseline and never pruned.
    assert status == {
        "scratch": "running",
        "feature_extraction": "running",
        "freeze_unfreeze": "running",
        "fine_tune": "pruned",
    }
    pruned = next(t for t in after["trials"] if t["strategy"] == "fine_tune")
    assert "val accuracy 0.200 below 0.800" in pruned["reason"]
    with context.db.session() as session:
        assert session.get_one(Job, pruned["job_id"]).status == "cancelling"
    row = next(r for r in after["leaderboard"] if r["strategy"] == "fine_tune")
    assert row["status"] == "pruned"
    events = client.get(f"/v1/experiments/{experiment['id']}/events", headers=auth).json()
    assert {
        "trial_id": pruned["id"],
        "status": "pruned",
        "job_id": pruned["job_id"],
        "epoch": 1,
        "val_accuracy": 0.2,
        "cutoff": 0.8,
        "peers": 4,
    } in [e["data"] for e in events["data"]]


def text_dataset(
    client: TestClient, context: AppContext, auth: dict[str, str], *, rows: int
) -> str:
    """A ready text dataset of the first `rows` Debian descriptions of three sections."""
    with DEBIAN_DESCRIPTIONS.open(encoding="utf-8", newline="") as source:
        chosen = [r for r in csv.DictReader(source) if r["label"] in {"games", "sound", "mail"}]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["text", "label"])
    writer.writerows([r["text"], r["label"]] for r in chosen[:rows])
    uploaded = client.post(
        "/v1/datasets", headers=auth, files={"file": ("debian.csv", out.getvalue().encode())}
    )
    assert uploaded.status_code == 202, uploaded.text
    dataset: str = uploaded.json()["id"]
    process_upload(context=context, dataset_id=dataset)
    return dataset


def test_a_text_experiment_holds_out_test_rows_and_ranks_its_trials(
    client: TestClient,
    context: AppContext,
    auth: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dataset = text_dataset(client, context, auth, rows=120)
    trained_on: dict[str, set[str]] = {}
    real_run = worker.jobs.training.run

    def recording_run(plan: Any, *, train: list[Any], val: list[Any], **rest: Any) -> Any:
        trained_on[plan.extra["strategy"]] = {s.text for s in [*train, *val]}
        return real_run(plan, train=train, val=val, **rest)

    monkeypatch.setattr(worker.jobs.training, "run", recording_run)
    strategies = ["scratch", "feature_extraction"]
    request = experiment_request(
        dataset,
        model="debian-exp",
        base_models=["minilm_l6"],
        strategies=strategies,
        settings={"epochs": 1, "batch_size": 16, "lr": 0.001, "max_length": 32, "seed": 1},
    )
    created = client.post("/v1/experiments", headers=auth, json=request)
    assert created.status_code == 201, created.text
    experiment = run_trials(client, context, auth, created.json())
    assert experiment["status"] == "succeeded", experiment["trials"]

    # The held-out rows, read straight from the dataset's shards by their ordinal.
    split = client.get(f"/v1/experiments/{experiment['id']}/test-split", headers=auth).json()
    manifest, root = load_manifest(context=context, dataset_id=dataset)
    texts = [row.text for row in iter_text_rows(root, manifest.shards)]
    assert len(texts) == len(set(texts)) == 120
    test_texts = {texts[int(item.removeprefix("row:"))] for item in split["items"]}
    assert len(test_texts) == experiment["test_size"] >= 24  # a quarter, per class and split
    assert set(trained_on) == set(strategies)
    for strategy, seen in trained_on.items():
        assert not seen & test_texts, strategy
        assert seen | test_texts == set(texts), strategy

    board = experiment["leaderboard"]
    assert sorted(row["strategy"] for row in board) == sorted(strategies)
    for row in board:
        assert row["status"] == "succeeded"
        low, high = row["test_accuracy_interval"]
        assert 0.0 <= low <= row["test_accuracy"] <= high <= 1.0
        # A confident model's float32 probabilities can round to exactly 1 on every item, so
        # the loss may be 0; with any item wrong it cannot be.
        assert row["test_loss"] >= 0
        assert row["test_accuracy"] == 1.0 or row["test_loss"] > 0
        assert row["latency_ms_per_item"] > 0
        version = client.get(
            f"/v1/models/debian-exp/versions/{row['version']}", headers=auth
        ).json()
        assert version["metrics"]["test_items"] == len(test_texts)
    (base,) = experiment["diagnosis"]["base_models"]
    assert [c["strategy"] for c in base["comparisons"]] == ["feature_extraction"]


def test_preselect_scores_candidates_outside_the_test_split_and_keeps_the_best(
    client: TestClient,
    context: AppContext,
    auth: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dataset = digits_dataset(client, context, auth, [0, 1, 2])
    scored_on: dict[str, list[str]] = {}
    real_score = engine.score_base_model
    real_weights = engine.weights_available

    def recording_score(name: str, samples: list[Any], **options: Any) -> Any:
        scored_on[name] = [str(sample.path) for sample in samples]
        if name == "resnet18":  # no weights here: a made-up, lower score stands in for it
            return dataclasses.replace(
                real_score("efficientnet_lite0", samples, **options),
                base_model="resnet18",
                logme=-1e9,
            )
        return real_score(name, samples, **options)

    monkeypatch.setattr(engine, "score_base_model", recording_score)
    monkeypatch.setattr(
        engine,
        "weights_available",
        lambda name, where: name == "resnet18" or real_weights(name, where),
    )
    request = experiment_request(
        dataset,
        base_models=["resnet18", "efficientnet_lite0"],
        strategies=["scratch", "fine_tune"],
        preselect=1,
    )
    created = client.post("/v1/experiments", headers=auth, json=request)
    assert created.status_code == 201, created.text
    experiment = created.json()
    assert {t["base_model"] for t in experiment["trials"]} == {"efficientnet_lite0"}
    preselection = experiment["preselection"]
    assert preselection["kept"] == ["efficientnet_lite0"]
    assert preselection["dropped"] == ["resnet18"]
    assert [r["base_model"] for r in preselection["ranking"]] == ["efficientnet_lite0", "resnet18"]
    assert preselection["ranking"][0]["logme"] > preselection["ranking"][1]["logme"]

    # Scored on the dataset's training images outside the test split, every one of them.
    split = client.get(f"/v1/experiments/{experiment['id']}/test-split", headers=auth).json()
    manifest, root = load_manifest(context=context, dataset_id=dataset)
    test_paths = {str(root / item) for item in split["items"]}
    train_paths = {str(root / s.path) for s in manifest.samples if s.split == "train"}
    for name in ("efficientnet_lite0", "resnet18"):
        assert set(scored_on[name]) == train_paths - test_paths, name
    assert preselection["images"] == len(train_paths - test_paths)
    shown = client.get(f"/v1/experiments/{experiment['id']}", headers=auth).json()
    assert shown["preselection"] == preselection

    too_many = experiment_request(dataset, preselect=2)
    assert_error(
        client.post("/v1/experiments", headers=auth, json=too_many), 422, "invalid_request"
    )
    # Preselect on a text dataset: tests/test_text_datasets.py (it scores minilm_l6 per layer).
