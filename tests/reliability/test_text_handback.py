"""A text job handed back by SIGTERM through real worker processes resumes exactly (issue 10):
the first worker pauses mid-epoch and checkpoints, a second one continues from the next step,
and the published weights equal those of the same job run without interruption, bit for bit.

A tiny `minilm_l6` fine-tune (the real pretrained encoder, short sequences) on real text: rows of
the Debian package descriptions fixture."""

import csv
import io
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as load_safetensors

from tests.processes import poll
from tests.reliability.conftest import Fleet
from tests.reliability.test_job_faults import assert_published_once

pytestmark = pytest.mark.reliability

FLEET_ENV = {"THAW_LEASE_SECONDS": "60"}
"""A text job's setup (loading the encoder, tokenizing) renews no lease, and on a loaded
machine it outlasts the fleet's usual 6 s: the lease is not what this module tests."""

FIXTURE = Path(__file__).parents[1] / "fixtures" / "debian_descriptions.csv"
ROWS_PER_CLASS = 20
"""120 rows: 96 train (80%) in batches of 8, so 12 steps an epoch, each a fraction of a
second here: the pause lands inside the second epoch, not at its end."""
STEPS_PER_EPOCH = 12
TEXT_SPEC: dict[str, Any] = {
    "base_model": "minilm_l6",
    "strategy": "fine_tune",
    "batch_size": 8,
    "max_length": 16,
    "epochs": 2,
    "seed": 11,
}


@pytest.fixture(scope="module")
def texts(fleet: Fleet) -> str:
    """A ready text dataset; the worker that ingested it is stopped again."""
    with FIXTURE.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    seen: dict[str, int] = {}
    chosen = []
    for row in rows:
        if seen.get(row["label"], 0) < ROWS_PER_CLASS:
            seen[row["label"]] = seen.get(row["label"], 0) + 1
            chosen.append(row)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["text", "label", "package"])
    writer.writeheader()
    writer.writerows(chosen)
    worker = fleet.start_worker("datasets")
    upload = fleet.client.post(
        "/v1/datasets", files={"file": ("debian.csv", out.getvalue().encode())}
    )
    assert upload.status_code == 202, upload.text
    dataset = poll(fleet.client, f"/v1/datasets/{upload.json()['id']}", {"ready", "failed"}, 120)
    assert dataset["status"] == "ready", dataset
    assert dataset["modality"] == "text"
    worker.kill(signal.SIGTERM)
    worker.wait_exit()
    return str(dataset["id"])


def submit_text(fleet: Fleet, dataset_id: str, model: str) -> str:
    created = fleet.client.post(
        "/v1/jobs", json={**TEXT_SPEC, "dataset": dataset_id, "model": model}
    )
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def published_weights(fleet: Fleet, model: str) -> dict[str, torch.Tensor]:
    answer = fleet.client.get(f"/v1/models/{model}/versions/1/artifacts/weights.safetensors")
    return load_safetensors(answer.raise_for_status().content)


def test_sigterm_hand_back_of_a_text_job_resumes_exactly(fleet: Fleet, texts: str) -> None:
    first = fleet.start_worker()
    job_id = submit_text(fleet, texts, "handed-text")
    # The first epoch's event is written after its checkpoint: SIGTERM now lands in epoch 2.
    fleet.wait_until(f"job {job_id} past its first epoch", lambda: fleet.epochs(job_id) == [1])
    first.kill(signal.SIGTERM)
    assert first.wait_exit(timeout=60) == 0
    queued = fleet.job(job_id)
    assert queued["status"] == "queued", queued
    assert fleet.statuses(job_id)[-1] == {"status": "queued", "reason": "worker_shutdown"}

    second = fleet.start_worker()
    assert fleet.wait(job_id, {"succeeded", "failed", "cancelled"})["status"] == "succeeded"
    [resumed] = [s for s in fleet.statuses(job_id) if s["status"] == "resumed"]
    print("resumed:", resumed)
    # It continued from the step the first worker stopped at, inside epoch 2.
    assert resumed["completed_epochs"] == 1
    assert 0 < resumed["steps_into_epoch"] < STEPS_PER_EPOCH
    assert fleet.epochs(job_id) == [1, 2]
    assert fleet.job(job_id)["attempt"] == 2
    assert_published_once(fleet, job_id, "handed-text")

    # The same job, never interrupted, on the same worker.
    uninterrupted = submit_text(fleet, texts, "uninterrupted-text")
    done = fleet.wait(uninterrupted, {"succeeded", "failed", "cancelled"})
    assert (done["status"], done["attempt"]) == ("succeeded", 1), done
    assert_published_once(fleet, uninterrupted, "uninterrupted-text")
    assert second.process.poll() is None

    resumed_weights = published_weights(fleet, "handed-text")
    straight_weights = published_weights(fleet, "uninterrupted-text")
    assert resumed_weights.keys() == straight_weights.keys()
    differing = [
        name
        for name, tensor in straight_weights.items()
        if not torch.equal(resumed_weights[name], tensor)
    ]
    assert differing == [], f"{len(differing)} tensors differ, first: {differing[:3]}"
