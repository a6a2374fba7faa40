"""Monitoring over HTTP: a version's reference profile at publish, its predict traffic cut into
windows and tested for shift, accuracy estimated without labels, and labels fed back."""

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.cli import migrate_database
from service.datasets.ingest import IngestLimits
from service.datasets.service import process_upload
from service.db import new_id, utcnow
from service.inference.metrics import InferenceMetrics
from service.inference.resolution import ServedVersion
from service.inference.service import ItemReader
from service.main import create_app
from service.monitoring.capture import capture_key, capture_prefix, enforce_bounds
from service.monitoring.service import Recorder
from service.queues import SCORE_UPDATE_TASK
from service.tables import ModelUpdate, ModelVersion, MonitorPrediction
from service.updates.service import advance_all as advance_updates
from service.updates.service import promotion_decision
from tests.conftest import digits_split, make_settings, new_key, png_bytes, run_cli
from tests.test_api import assert_error, ready_dataset
from tests.test_registry import Registry, publish
from tests.test_webhooks import Received, Receiver, receiving, verify
from worker import jobs, updates

WINDOW = 20
CLASSES = 3


@dataclass
class Monitored(Registry):
    receiver: Receiver
    """Where team-a's webhook points (path `/hook`)."""
    secret: str


@pytest.fixture(scope="module")
def monitored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Monitored]:
    """`digits` v1 (3 classes, 50 images each, one epoch), windows of 20 predictions; the
    team's webhook set before the version was trained."""
    settings = make_settings(
        tmp_path_factory.mktemp("monitoring") / "data",
        monitor_window_size=WINDOW,
        webhook_allow_private=True,  # the receiver is on 127.0.0.1
    )
    migrate_database(settings)
    with TestClient(create_app(settings)) as client, receiving() as receiver:
        context = client.app.state.context  # type: ignore[attr-defined]
        auth = new_key(context, "team-a")
        hooked = client.put("/v1/webhook", headers=auth, json={"url": f"{receiver.url}/hook"})
        made = Monitored(
            client,
            context,
            auth,
            ready_dataset(client, context, auth, per_class=50),
            receiver,
            hooked.json()["secret"],
        )
        publish(made, epochs=1)
        yield made


def unseen_digits() -> list[tuple[np.ndarray, int]]:
    """Digits of the model's classes that were never uploaded: held out, then the pool's rest."""
    pool, held_out = digits_split()
    rest: list[tuple[np.ndarray, int]] = []
    for label in range(CLASSES):
        rest += [item for item in pool if item[1] == label][50:]
    return [item for item in held_out if item[1] < CLASSES] + rest


def predict(registry: Registry, images: list[np.ndarray]) -> list[dict[str, Any]]:
    files = [("images", (f"{i}.png", png_bytes(image))) for i, image in enumerate(images)]
    response = registry.client.post(
        "/v1/models/digits/versions/1/predict", headers=registry.auth, files=files
    )
    assert response.status_code == 200, response.text
    predictions: list[dict[str, Any]] = response.json()["predictions"]
    return predictions


def monitoring(registry: Registry, model: str = "digits", version: int = 1) -> dict[str, Any]:
    """The version's windows, once every recorded prediction is written."""
    recorder: Recorder = registry.client.app.state.monitor  # type: ignore[attr-defined]
    recorder.flush()
    response = registry.client.get(
        f"/v1/models/{model}/versions/{version}/monitoring", headers=registry.auth
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_shifted_traffic_alarms_the_estimate_falls_and_feedback_shows_accuracy(
    monitored: Registry,
) -> None:
    client, auth = monitored.client, monitored.auth
    before = monitoring(monitored)
    assert before["reference"] is True, before
    assert before["windows"] == []
    assert 0 < before["validation_accuracy"] <= 1
    card = client.get("/v1/models/digits/versions/1/artifacts/card.md", headers=auth).text
    assert "## Monitoring" in card
    assert "MMD permutation test" in card

    digits = unseen_digits()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(digits))
    normal = [digits[i] for i in order[: 3 * WINDOW]]
    answered = []
    for start in range(0, len(normal), 10):
        answered += predict(monitored, [image for image, _ in normal[start : start + 10]])
    calm = monitoring(monitored)["windows"]
    assert [window["count"] for window in calm] == [WINDOW] * 3
    assert not any(window["shifted"] for window in calm), calm
    assert all(window["sampled"] == WINDOW for window in calm)

    # The same kind of digits, inverted: bright strokes on black become dark on white.
    inverted = [255 - digits[i][0] for i in order[3 * WINDOW : 5 * WINDOW]]
    predict(monitored, inverted[:WINDOW])
    predict(monitored, inverted[WINDOW:])
    windows = monitoring(monitored)["windows"]
    shifted = windows[3:]
    assert len(shifted) == 2
    assert any(window["shifted"] for window in shifted), shifted
    assert shifted[-1]["p_value"] < min(window["p_value"] for window in calm)
    calm_estimate = np.mean([window["estimated_accuracy"] for window in calm])
    assert max(window["estimated_accuracy"] for window in shifted) < calm_estimate
    assert sum(shifted[0]["class_frequencies"].values()) == pytest.approx(1.0)

    # Labels fed back for the first window's predictions: observed accuracy beside the estimate.
    labels = [f"digit_{label}" for _, label in normal]
    feedback = [
        {"prediction_id": p["prediction_id"], "label": label}
        for p, label in zip(answered[:WINDOW], labels[:WINDOW], strict=True)
    ]
    response = client.post(
        "/v1/models/digits/versions/1/feedback", headers=auth, json={"feedback": feedback}
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"recorded": WINDOW}
    first = monitoring(monitored)["windows"][0]
    right = sum(
        p["top"][0]["label"] == label
        for p, label in zip(answered[:WINDOW], labels[:WINDOW], strict=True)
    )
    assert first["observed_accuracy"] == pytest.approx(right / WINDOW)
    assert first["labelled"] == WINDOW
    assert monitoring(monitored)["windows"][1]["observed_accuracy"] is None

    # The latest window's gauges, and the table `thaw models monitor` prints.
    scrape = client.get("/metrics").text
    version_id = client.get("/v1/models/digits/versions/1", headers=auth).json()["id"]
    assert f'thaw_monitor_shifted{{version_id="{version_id}"}} 1.0' in scrape
    assert "thaw_monitor_estimated_accuracy{" in scrape
    shown = run_cli(monitored.client, monitored.auth, ["models", "monitor", "digits:1"])
    assert "SHIFTED" in shown
    assert "validation accuracy" in shown

    one = client.post(
        "/v1/models/digits/versions/1/feedback",
        headers=auth,
        json={"prediction_id": answered[WINDOW]["prediction_id"], "label": labels[WINDOW]},
    )
    assert one.json() == {"recorded": 1}


def test_the_model_page_plots_shift_and_accuracy_and_marks_shifted_windows(
    monitored: Registry,
) -> None:
    """After the first test: calm windows, then inverted ones that alarmed, one labelled."""
    client, auth = monitored.client, monitored.auth
    windows = monitoring(monitored)["windows"]
    cookie = {"Cookie": f"thaw_key={auth['Authorization'].removeprefix('Bearer ')}"}
    page = client.get("/ui/models", headers=cookie)
    assert page.status_code == 200
    src = "/ui/api/v1/models/digits/versions/1/plots/monitoring.svg"
    assert f'src="{src}"' in page.text
    plot = client.get(src, headers=cookie)
    assert plot.status_code == 200, plot.text
    assert plot.headers["content-type"] == "image/svg+xml"
    svg = plot.text
    for legend in ("shift score", "estimated accuracy", "observed accuracy (feedback)"):
        assert f">{legend}<" in svg
    marked = {int(seq) for seq in re.findall(r'id="shifted-window-(\d+)"', svg)}
    assert marked == {window["seq"] for window in windows if window["shifted"]}
    assert marked, windows
    other = new_key(monitored.context, "team-e")
    hidden = client.get("/v1/models/digits/versions/1/plots/monitoring.svg", headers=other)
    assert hidden.status_code == 404


def test_a_broken_monitor_is_a_log_line_and_a_metric_never_a_failed_predict(
    monitored: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: Any) -> None:
        raise RuntimeError("monitor broke")

    monkeypatch.setattr("service.monitoring.service.summarise", broken)

    def failures() -> float:
        scrape = monitored.client.get("/metrics").text
        (count,) = re.findall(r"^thaw_monitor_failures_total (\S+)$", scrape, re.MULTILINE)
        return float(count)

    before = failures()
    (answer,) = predict(monitored, [unseen_digits()[0][0]])
    assert answer["top"]
    monitoring(monitored)
    assert failures() == before + 1


def test_feedback_for_an_unknown_or_another_teams_prediction_is_404(monitored: Registry) -> None:
    client, auth = monitored.client, monitored.auth
    (answer,) = predict(monitored, [unseen_digits()[0][0]])
    monitoring(monitored)
    url = "/v1/models/digits/versions/1/feedback"
    unknown = client.post(url, headers=auth, json={"prediction_id": "pr_nope", "label": "digit_0"})
    assert_error(unknown, 404, "prediction_not_found")
    wrong = client.post(
        url, headers=auth, json={"prediction_id": answer["prediction_id"], "label": "cat"}
    )
    assert_error(wrong, 422, "unknown_label")
    both = client.post(
        url, headers=auth, json={"prediction_id": answer["prediction_id"], "feedback": []}
    )
    assert both.status_code == 422
    # Another team has its own `digits`: the id is not its version's prediction.
    other = new_key(monitored.context, "team-b")
    theirs = client.post(
        url, headers=other, json={"prediction_id": answer["prediction_id"], "label": "digit_0"}
    )
    assert theirs.status_code == 404


def test_a_version_without_a_reference_says_why(monitored: Registry) -> None:
    with monitored.context.db.session() as session:
        version = session.query(ModelVersion).one()
        exports = dict(version.exports)
        version.exports = {key: value for key, value in exports.items() if key != "monitoring"}
        session.commit()
    try:
        shown = monitored.client.get(
            "/v1/models/digits/versions/1/monitoring", headers=monitored.auth
        ).json()
        assert shown["reference"] is False
        assert "before monitoring" in shown["reason"]
    finally:
        with monitored.context.db.session() as session:
            session.query(ModelVersion).one().exports = exports
            session.commit()


def test_windows_pool_the_traffic_of_several_processes(monitored: Registry) -> None:
    # Two recorders on one database, as two API processes have: neither records a window's
    # worth, together they close one.
    context = monitored.context
    with context.db.session() as session:
        served = ServedVersion.of(session.query(ModelVersion).one())
    model = monitored.client.app.state.predictors.get(served)  # type: ignore[attr-defined]
    images = [(str(i), png_bytes(image)) for i, (image, _) in enumerate(unseen_digits()[:WINDOW])]
    reading = ItemReader(IngestLimits(), max_text_chars=0)
    _, _, pixels = model.inputs.prepare(list(images), reading)
    outputs = model.forward(model.batch_input([pixels]))
    before = len(monitoring(monitored)["windows"])
    processes = [Recorder(context, InferenceMetrics()) for _ in range(2)]
    try:
        half = WINDOW // 2
        for index, recorder in enumerate(processes):
            rows = range(index * half, (index + 1) * half)
            ids = [new_id("pr") for _ in rows]
            recorder.record(served, model, ids, outputs.rows(rows.start, rows.stop))
            recorder.flush()
    finally:
        for recorder in processes:
            recorder.close()
    windows = monitoring(monitored)["windows"]
    assert len(windows) == before + 1
    assert windows[-1]["count"] == WINDOW


def captures(
    registry: Registry, auth: dict[str, str] | None = None, model: str = "digits"
) -> dict[str, Any]:
    registry.client.app.state.monitor.flush()  # type: ignore[attr-defined]
    response = registry.client.get(f"/v1/models/{model}/captures", headers=auth or registry.auth)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_capture_keeps_inputs_only_when_on_bounded_and_deletable(monitored: Registry) -> None:
    client, auth, store = monitored.client, monitored.auth, monitored.context.store
    assert captures(monitored)["items"] == 0
    images = [image for image, _ in unseen_digits()[:4]]
    predict(monitored, images[:1])
    assert captures(monitored)["items"] == 0  # off by default: nothing of an input is kept

    patched = client.patch("/v1/models/digits", headers=auth, json={"capture": True})
    assert patched.status_code == 200, patched.text
    assert patched.json()["capture"] is True
    # One call each: their order in time is what the bound goes by.
    answered = [answer for image in images for answer in predict(monitored, [image])]
    kept = captures(monitored)
    assert (kept["capture"], kept["items"], kept["labelled"]) == (True, 4, 0)
    with monitored.context.db.session() as session:
        model_id = session.query(ModelVersion).one().model_id
        rows = {
            row.id: row
            for row in session.query(MonitorPrediction).filter(
                MonitorPrediction.input_key.is_not(None)
            )
        }
    first = rows[answered[0]["prediction_id"]]
    assert first.input_key == capture_key(model_id, first.id)
    assert store.get_bytes(first.input_key) == png_bytes(images[0])
    assert kept["bytes"] == sum(len(png_bytes(image)) for image in images)

    client.post(
        "/v1/models/digits/versions/1/feedback",
        headers=auth,
        json={"prediction_id": answered[0]["prediction_id"], "label": "digit_0"},
    )
    assert captures(monitored)["labelled"] == 1
    # Another team sees no capture of this model (its own `digits` does not exist).
    other = new_key(monitored.context, "team-c")
    assert client.get("/v1/models/digits/captures", headers=other).status_code == 404
    assert client.delete("/v1/models/digits/captures", headers=other).status_code == 404

    # Over the bound, the oldest unlabelled inputs go first; the labelled one stays.
    with monitored.context.db.session() as session:
        dropped = enforce_bounds(session, store, model_id=model_id, max_items=2, max_bytes=10**9)
    assert dropped == 2
    with monitored.context.db.session() as session:
        left = {
            row.id
            for row in session.query(MonitorPrediction).filter(
                MonitorPrediction.input_key.is_not(None)
            )
        }
    assert left == {answered[0]["prediction_id"], answered[3]["prediction_id"]}
    assert not store.exists(rows[answered[1]["prediction_id"]].input_key or "")

    assert client.delete("/v1/models/digits/captures", headers=auth).status_code == 204
    assert captures(monitored)["items"] == 0
    assert not store.exists(capture_prefix(model_id))
    client.patch("/v1/models/digits", headers=auth, json={"capture": False})
    predict(monitored, images[:1])
    assert captures(monitored)["items"] == 0


def test_the_least_confident_of_each_window_are_flagged_listed_and_kept_longest(
    monitored: Registry,
) -> None:
    client, auth, context = monitored.client, monitored.auth, monitored.context
    for bad in (-1, 1001, "3", True, 2.5):
        refused = client.patch(
            "/v1/models/digits", headers=auth, json={"capture_least_confident": bad}
        )
        assert_error(refused, 422, "invalid_request", "capture_least_confident")
    patched = client.patch(
        "/v1/models/digits", headers=auth, json={"capture": True, "capture_least_confident": 3}
    )
    assert patched.status_code == 200, patched.text
    assert (patched.json()["capture"], patched.json()["capture_least_confident"]) == (True, 3)

    # Upright and inverted digits: confidences from sure to unsure, two windows' worth.
    digits = [image for image, _ in unseen_digits()[:WINDOW]]
    sent = [image if index % 2 else 255 - image for index, image in enumerate(digits * 2)]
    answered = predict(monitored, sent[:WINDOW]) + predict(monitored, sent[WINDOW:])
    kept = captures(monitored)
    mine = {answer["prediction_id"] for answer in answered}
    with context.db.session() as session:
        rows = session.query(MonitorPrediction).filter(MonitorPrediction.id.in_(mine)).all()
        model_id = session.query(ModelVersion).one().model_id
    windows: dict[str | None, list[MonitorPrediction]] = {}
    for row in rows:
        windows.setdefault(row.window_id, []).append(row)
    expected = {
        row.id
        for window_id, members in windows.items()
        if window_id is not None
        for row in sorted(members, key=lambda row: row.confidence)[:3]
    }
    assert len(expected) == 3 * sum(window_id is not None for window_id in windows) >= 3
    assert {row.id for row in rows if row.low_confidence} == expected
    assert kept["low_confidence"] == len(expected)
    assert kept["capture_least_confident"] == 3

    listed = client.get(
        "/v1/models/digits/captures", headers=auth, params={"low_confidence": True}
    ).json()["inputs"]
    assert {item["prediction_id"] for item in listed} == expected
    assert all(item["low_confidence"] for item in listed)
    confidences = [item["confidence"] for item in listed]
    assert confidences == sorted(confidences)
    assert [item["low_confidence"] for item in kept["inputs"][: len(expected)]] == [True] * len(
        expected
    )
    other = new_key(context, "team-f")
    hidden = client.get(
        "/v1/models/digits/captures", headers=other, params={"low_confidence": True}
    )
    assert hidden.status_code == 404

    # Bounded: past the bound the other unlabelled inputs go first, then the flagged ones.
    store = context.store
    with context.db.session() as session:
        enforce_bounds(session, store, model_id=model_id, max_items=len(expected), max_bytes=10**9)
    left = captures(monitored)
    assert (left["items"], left["low_confidence"]) == (len(expected), len(expected))
    with context.db.session() as session:
        enforce_bounds(session, store, model_id=model_id, max_items=1, max_bytes=10**9)
    assert (captures(monitored)["items"], captures(monitored)["low_confidence"]) == (1, 1)

    assert client.delete("/v1/models/digits/captures", headers=auth).status_code == 204
    assert captures(monitored)["low_confidence"] == 0
    client.patch(
        "/v1/models/digits", headers=auth, json={"capture": False, "capture_least_confident": 0}
    )


def test_an_update_from_feedback_is_scored_on_it_and_on_the_old_task(monitored: Registry) -> None:
    """The champion/challenger step: inverted digits (the shift the first test alarms on) are
    captured and labelled; an `lwf` update from that feedback is scored beside the version on
    the held-out feedback and on the version's own validation items, and `auto` promotes by
    the rule."""
    client, auth, context = monitored.client, monitored.auth, monitored.context
    client.patch("/v1/models/digits", headers=auth, json={"capture": True})
    unseen = unseen_digits()
    # 20 of each class, from the end: none the first test sent.
    digits = [
        item
        for label in range(CLASSES)
        for item in [item for item in unseen if item[1] == label][-20:]
    ]
    answered: list[dict[str, Any]] = []
    for start in range(0, len(digits), 20):
        answered += predict(monitored, [255 - image for image, _ in digits[start : start + 20]])
    feedback = [
        {"prediction_id": p["prediction_id"], "label": f"digit_{label}"}
        for p, (_, label) in zip(answered, digits, strict=True)
    ]
    captures(monitored)
    client.post("/v1/models/digits/versions/1/feedback", headers=auth, json={"feedback": feedback})
    assert captures(monitored)["labelled"] == len(digits)

    url = "/v1/models/digits/updates"
    refused = client.post(url, headers=auth, json={"strategy": "scratch"})
    assert_error(refused, 422, "invalid_request")
    body = {
        "promote": "auto",
        "margin": 0.05,
        "settings": {"epochs": 2, "batch_size": 16, "lr": 0.01, "image_size": 64, "seed": 1},
    }
    made = client.post(url, headers=auth, json=body)
    assert made.status_code == 202, made.text
    update = made.json()
    assert (update["status"], update["from_version"]) == ("preparing", 1)
    assert (update["holdout_items"], update["training_items"]) == (18, 42)
    other = new_key(context, "team-d")
    assert client.get(f"{url}/{update['id']}", headers=other).status_code == 404

    done = train_update(monitored, update)
    scores = done["scores"]
    assert done["candidate_version"] == 2
    assert scores["feedback_items"] == 18
    assert scores["old_task_items"] > 0
    assert scores["feedback_accuracy"] > scores["current_feedback_accuracy"]
    lost = scores["current_old_task_accuracy"] - scores["old_task_accuracy"]
    assert done["promoted"] is (lost < 0.05)
    aliases = client.get("/v1/models/digits", headers=auth).json()["aliases"]
    assert aliases.get("production") == (2 if done["promoted"] else None)
    # Asked, it is promoted whatever the rule said.
    promoted = client.post(f"{url}/{update['id']}/promote", headers=auth)
    assert promoted.status_code == 200, promoted.text
    assert promoted.json()["promoted"] is True
    assert client.get("/v1/models/digits", headers=auth).json()["aliases"]["production"] == 2


def train_update(registry: Registry, update: dict[str, Any]) -> dict[str, Any]:
    """What the workers do with a created update, in process: ingest its feedback dataset,
    start its job, train it (the worker scores it after the job); the update once ready."""
    client, auth, context = registry.client, registry.auth, registry.context
    url = f"/v1/models/{update['model']}/updates/{update['id']}"
    process_upload(context=context, dataset_id=update["dataset_id"])
    advance_updates(context)
    training = client.get(url, headers=auth).json()
    assert training["status"] == "training", (training["error_code"], training["error_message"])
    jobs.execute(context, job_id=training["job_id"])
    done: dict[str, Any] = client.get(url, headers=auth).json()
    assert done["status"] == "ready", done
    return done


@pytest.mark.parametrize(
    ("rule", "feedback", "old", "promoted"),
    [
        ("auto", (0.9, 0.5), (0.80, 0.81), True),  # better, loses 0.01 < 0.02
        ("auto", (0.9, 0.5), (0.78, 0.81), False),  # loses 0.03
        ("auto", (0.9, 0.5), (0.79, 0.81), False),  # loses the margin itself
        ("auto", (0.5, 0.5), (0.90, 0.81), False),  # no better on feedback
        ("auto", (0.9, 0.5), (None, None), False),  # the old task could not be scored
        (True, (0.1, 0.5), (0.10, 0.81), True),  # asked
        (False, (0.9, 0.5), (0.81, 0.81), False),  # not asked
    ],
)
def test_auto_promotes_only_a_candidate_better_on_feedback_within_the_margin(
    rule: bool | str,
    feedback: tuple[float, float],
    old: tuple[float | None, float | None],
    promoted: bool,
) -> None:
    scores = {
        "feedback_accuracy": feedback[0],
        "current_feedback_accuracy": feedback[1],
        "old_task_accuracy": old[0],
        "current_old_task_accuracy": old[1],
    }
    decided, why = promotion_decision(rule=rule, margin=0.02, scores=scores)
    assert decided is promoted, why


def test_the_teams_webhook_heard_each_job_each_shifted_window_and_the_update(
    monitored: Monitored,
) -> None:
    """After the tests above: v1's job, the inverted windows that alarmed, the update's job
    and its scores, each as a signed event."""

    def heard(received: list[Received]) -> dict[str, list[dict[str, Any]]]:
        events: dict[str, list[dict[str, Any]]] = {}
        for request in received:
            event = verify(monitored.secret, request)
            events.setdefault(event["event"], []).append(event["data"])
        return events

    shifted = [window for window in monitoring(monitored)["windows"] if window["shifted"]]
    update = monitored.client.get("/v1/models/digits/updates", headers=monitored.auth).json()
    received = monitored.receiver.wait_until(
        "/hook",
        # Every event the test checks, since they are sent concurrently: the update's job can
        # be heard after the update itself.
        lambda received: (
            len(heard(received).get("version.shifted", [])) == len(shifted)
            and "update.ready" in heard(received)
            and len(heard(received).get("job.succeeded", [])) == 2
        ),
    )
    events = heard(received)
    # Sent concurrently: in any order.
    assert sorted((e["model"], e["version"]) for e in events["job.succeeded"]) == [
        ("digits", 1),
        ("digits", 2),
    ]
    assert sorted(e["window"] for e in events["version.shifted"]) == [w["seq"] for w in shifted]
    assert all(e["p_value"] < 0.01 for e in events["version.shifted"])
    (ready,) = events["update.ready"]
    assert ready["update_id"] == update[0]["id"]
    assert (ready["candidate_version"], ready["from_version"]) == (2, 1)
    assert "job.failed" not in events


def test_a_scoring_lost_with_its_worker_is_sent_again_by_the_reaper_then_given_up(
    monitored: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The update above, as if its worker died while scoring: the reaper's pass sends the
    scoring again (to the job's queue) and a worker finishes it; once the scoring workers
    vanished `THAW_MAX_WORKER_LOSSES` times, the update fails `worker_lost`."""
    context = monitored.context
    sent: list[tuple[str, list[str], str]] = []
    monkeypatch.setattr(
        context.celery,
        "send_task",
        lambda name, args, queue: sent.append((name, args, queue)),
    )
    with context.db.session() as session:
        update = session.query(ModelUpdate).one()
        update_id, job_id = update.id, update.job_id
        update.status, update.scores = "scoring", None
        update.updated_at = utcnow() - timedelta(hours=1)
        session.commit()
    advance_updates(context)
    assert sent == [(SCORE_UPDATE_TASK, [job_id], "cpu")]
    advance_updates(context)  # sent a moment ago: not again
    assert len(sent) == 1
    updates.score_after_job(context, job_id=job_id)  # what the task runs
    url = f"/v1/models/digits/updates/{update_id}"
    rescored = monitored.client.get(url, headers=monitored.auth).json()
    assert rescored["status"] == "ready", rescored
    assert rescored["candidate_version"] == 2
    assert rescored["scores"]["feedback_items"] == 18

    with context.db.session() as session:
        update = session.get_one(ModelUpdate, update_id)
        update.status = "scoring"
        update.scoring_sent = context.settings.max_worker_losses
        update.updated_at = utcnow() - timedelta(hours=1)
        session.commit()
    advance_updates(context)
    given_up = monitored.client.get(url, headers=monitored.auth).json()
    assert (given_up["status"], given_up["error_code"]) == ("failed", "worker_lost")
    assert len(sent) == 1
