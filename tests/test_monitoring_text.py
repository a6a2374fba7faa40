"""Monitoring a text model over HTTP, as tests/test_monitoring.py does an image one: a
`minilm_l6` version trained on Debian package descriptions watches its traffic; descriptions
of its own kind do not alarm, the same descriptions enciphered (ROT13: to the tokenizer, a
language it never saw, while every text keeps its true label) alarm within two windows and the
estimate falls; labels fed back give the observed accuracy, and an update from them is better
on the enciphered traffic while its old-task accuracy is reported."""

import codecs
import csv
import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.cli import migrate_database
from service.datasets.service import process_upload
from service.main import create_app
from tests.conftest import make_settings, new_key
from tests.engine.test_text_train import debian_texts
from tests.test_monitoring import captures, monitoring, train_update
from tests.test_registry import Registry
from worker import jobs

WINDOW = 20
MODEL = "sections"
TRAINED_PER_CLASS = 11
"""Descriptions of each of the six sections uploaded; traffic is drawn from the rest."""


@pytest.fixture(scope="module")
def text_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """`sections` v1: a head on frozen `minilm_l6` features (3 epochs, no refit), windows of 20."""
    settings = make_settings(
        tmp_path_factory.mktemp("monitoring-text") / "data", monitor_window_size=WINDOW
    )
    migrate_database(settings)
    with TestClient(create_app(settings)) as client:
        context = client.app.state.context  # type: ignore[attr-defined]
        auth = new_key(context, "team-a")
        samples, classes = debian_texts(TRAINED_PER_CLASS)
        rows = io.StringIO()
        writer = csv.writer(rows)
        writer.writerow(["text", "label"])
        writer.writerows([sample.text, classes[sample.label]] for sample in samples)
        uploaded = client.post(
            "/v1/datasets",
            headers=auth,
            files={"file": ("sections.csv", rows.getvalue().encode())},
            data={"val_fraction": "0.25"},
        )
        assert uploaded.status_code == 202, uploaded.text
        dataset_id = uploaded.json()["id"]
        process_upload(context=context, dataset_id=dataset_id)
        spec = {
            "dataset": dataset_id,
            "model": MODEL,
            "base_model": "minilm_l6",
            "strategy": "feature_extraction",
            "epochs": 3,
            "lr": 0.01,
            "max_length": 24,
            "seed": 1,
            "refit": False,
        }
        job = client.post("/v1/jobs", headers=auth, json=spec)
        assert job.status_code == 201, job.text
        jobs.execute(context, job_id=job.json()["id"])
        done = client.get(f"/v1/jobs/{job.json()['id']}", headers=auth).json()
        assert done["status"] == "succeeded", done
        yield Registry(client, context, auth, dataset_id)


def unseen_texts() -> list[tuple[str, str]]:
    """(description, section) never uploaded, shuffled once."""
    samples, classes = debian_texts(100, skip=TRAINED_PER_CLASS)
    order = np.random.default_rng(0).permutation(len(samples))
    return [(samples[i].text, classes[samples[i].label]) for i in order]


def enciphered(text: str) -> str:
    return codecs.encode(text, "rot13")


def predict_texts(registry: Registry, texts: list[str]) -> list[dict[str, Any]]:
    response = registry.client.post(
        f"/v1/models/{MODEL}/versions/1/predict", headers=registry.auth, json={"texts": texts}
    )
    assert response.status_code == 200, response.text
    predictions: list[dict[str, Any]] = response.json()["predictions"]
    return predictions


def accuracy(predictions: list[dict[str, Any]], labels: list[str]) -> float:
    right = sum(p["top"][0]["label"] == label for p, label in zip(predictions, labels, strict=True))
    return right / len(labels)


def test_enciphered_text_alarms_the_estimate_falls_and_feedback_shows_accuracy(
    text_model: Registry,
) -> None:
    client, auth = text_model.client, text_model.auth
    before = monitoring(text_model, MODEL)
    assert before["reference"] is True, before
    assert before["windows"] == []

    texts = unseen_texts()
    normal = texts[: 3 * WINDOW]
    answered: list[dict[str, Any]] = []
    for start in range(0, len(normal), 10):
        answered += predict_texts(text_model, [text for text, _ in normal[start : start + 10]])
    calm = monitoring(text_model, MODEL)["windows"]
    assert [window["count"] for window in calm] == [WINDOW] * 3
    assert not any(window["shifted"] for window in calm), calm

    shifted_texts = [enciphered(text) for text, _ in texts[3 * WINDOW : 5 * WINDOW]]
    predict_texts(text_model, shifted_texts[:WINDOW])
    predict_texts(text_model, shifted_texts[WINDOW:])
    windows = monitoring(text_model, MODEL)["windows"]
    shifted = windows[3:]
    assert len(shifted) == 2
    assert any(window["shifted"] for window in shifted), shifted
    calm_estimate = np.mean([window["estimated_accuracy"] for window in calm])
    assert max(window["estimated_accuracy"] for window in shifted) < calm_estimate

    labels = [label for _, label in normal]
    feedback = [
        {"prediction_id": p["prediction_id"], "label": label}
        for p, label in zip(answered[:WINDOW], labels[:WINDOW], strict=True)
    ]
    response = client.post(
        f"/v1/models/{MODEL}/versions/1/feedback", headers=auth, json={"feedback": feedback}
    )
    assert response.json() == {"recorded": WINDOW}, response.text
    first = monitoring(text_model, MODEL)["windows"][0]
    assert first["observed_accuracy"] == pytest.approx(accuracy(answered[:WINDOW], labels[:WINDOW]))


def test_an_update_from_enciphered_feedback_is_better_on_it_and_scored_on_the_old_task(
    text_model: Registry,
) -> None:
    """Enciphered descriptions (none sent above) are captured as UTF-8 and labelled; an `lwf`
    update from them trains on a CSV of those texts, beats the version on the held-out ones,
    reports the version's own validation accuracy beside its own, and `auto` follows the rule."""
    client, auth = text_model.client, text_model.auth
    patched = client.patch(f"/v1/models/{MODEL}", headers=auth, json={"capture": True})
    assert patched.status_code == 200, patched.text
    texts = unseen_texts()[-60:]
    sent = [enciphered(text) for text, _ in texts]
    answered: list[dict[str, Any]] = []
    for start in range(0, len(sent), WINDOW):
        answered += predict_texts(text_model, sent[start : start + WINDOW])
    feedback = [
        {"prediction_id": p["prediction_id"], "label": label}
        for p, (_, label) in zip(answered, texts, strict=True)
    ]
    captures(text_model, model=MODEL)
    client.post(
        f"/v1/models/{MODEL}/versions/1/feedback", headers=auth, json={"feedback": feedback}
    )
    kept = captures(text_model, model=MODEL)
    assert kept["labelled"] == len(texts)
    assert kept["bytes"] == sum(len(text.encode()) for text in sent)

    body = {
        "promote": "auto",
        "margin": 0.05,
        "settings": {"epochs": 3, "lr": 0.01, "max_length": 24, "seed": 1, "refit": False},
    }
    made = client.post(f"/v1/models/{MODEL}/updates", headers=auth, json=body)
    assert made.status_code == 202, made.text
    done = train_update(text_model, made.json())
    scores = done["scores"]
    assert done["candidate_version"] == 2
    assert scores["feedback_items"] == done["holdout_items"] > 0
    assert scores["old_task_items"] > 0
    assert scores["old_task_accuracy"] is not None
    assert scores["feedback_accuracy"] > scores["current_feedback_accuracy"]
    lost = scores["current_old_task_accuracy"] - scores["old_task_accuracy"]
    assert done["promoted"] is (lost < 0.05), done["decision"]
    aliases = client.get(f"/v1/models/{MODEL}", headers=auth).json()["aliases"]
    assert aliases.get("production") == (2 if done["promoted"] else None)
    print(
        f"text update: held-out enciphered feedback {scores['current_feedback_accuracy']:.3f}"
        f" -> {scores['feedback_accuracy']:.3f}; old task "
        f"{scores['current_old_task_accuracy']:.3f} -> {scores['old_task_accuracy']:.3f}"
    )
