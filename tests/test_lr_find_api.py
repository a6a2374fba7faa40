"""The learning-rate finder over HTTP: `POST /v1/jobs/lr-find` as a job, its curve and plot, and
`lr: "auto"` in a training spec recording the rate it chose (real digits, efficientnet_lite0)."""

from typing import Any

from fastapi.testclient import TestClient

from service.context import AppContext
from tests.test_api import assert_error, small_spec
from tests.test_strategies_api import digits_dataset
from worker import jobs


def _events(client: TestClient, auth: dict[str, str], job_id: str) -> list[dict[str, Any]]:
    page = client.get(f"/v1/jobs/{job_id}/events?limit=100", headers=auth).json()
    return list(page["data"])


def test_lr_find_job_and_lr_auto(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    dataset = digits_dataset(client, context, auth, [0, 1, 2, 3])
    spec = small_spec(dataset, strategy="freeze_unfreeze", lr="auto", epochs=2)

    preview = client.post("/v1/jobs/plan", headers=auth, json=spec).json()
    for stage in preview["stages"]:
        assert stage["lr"] == "auto, resolved at run time"
        assert {group["lr"] for group in stage["trainable_groups"]} == {None}
    assert_error(
        client.post("/v1/jobs/plan", headers=auth, json={**spec, "lr": "fast"}),
        422,
        "invalid_request",
        "lr",
    )

    # The finder is a job like any other: queued, cancellable, with events.
    spare = client.post("/v1/jobs/lr-find", headers=auth, json=spec)
    assert spare.status_code == 201, spare.text
    assert client.post(f"/v1/jobs/{spare.json()['id']}/cancel", headers=auth).json()["status"] == (
        "cancelled"
    )

    created = client.post("/v1/jobs/lr-find", headers=auth, json={**spec, "lr": 0.5})
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["kind"] == "lr_find"
    assert_error(client.get(f"/v1/jobs/{job['id']}/lr-find", headers=auth), 409, "no_lr_finding")
    jobs.execute(context, job_id=job["id"])
    done = client.get(f"/v1/jobs/{job['id']}", headers=auth).json()
    assert done["status"] == "succeeded", done
    assert done["model_version_id"] is None
    assert [e["kind"] for e in _events(client, auth, job["id"])][-2:] == ["lr_find", "status"]

    finding = client.get(f"/v1/jobs/{job['id']}/lr-find", headers=auth).json()
    assert finding["stage"] == "head"
    assert len(finding["lrs"]) == len(finding["losses"]) >= 20
    assert finding["suggestion"] == finding["lrs"][finding["suggestion_index"]]
    # The first stage is the head's, whose rate is the spec's lr (the one sent was ignored).
    assert finding["lr"] == finding["suggestion"]
    plot = client.get(finding["plot"], headers=auth)
    assert plot.headers["content-type"] == "image/svg+xml"
    assert "suggestion" in plot.text

    trained = client.post("/v1/jobs", headers=auth, json=spec).json()
    jobs.execute(context, job_id=trained["id"])
    done = client.get(f"/v1/jobs/{trained['id']}", headers=auth).json()
    assert done["status"] == "succeeded", done
    chosen = done["plan"]["extra"]["lr"]["auto"]
    # Deterministic: the same spec and seed find the same rate as the lr-find job did.
    assert chosen == finding["lr"]
    head, unfreeze = done["plan"]["stages"]
    assert head["group_lrs"] == {"head": chosen}
    assert not head["auto_lr"]
    assert not unfreeze["auto_lr"]
    version = client.get("/v1/models/digits/versions/1", headers=auth).json()
    assert version["plan"]["extra"]["lr"] == {"auto": chosen}
    epochs = client.get(f"/v1/jobs/{trained['id']}/metrics", headers=auth).json()["epochs"]
    assert epochs[0]["learning_rates"]["head"] < chosen  # cosine-decayed from the chosen rate
    assert client.get(f"/v1/jobs/{trained['id']}/lr-find", headers=auth).json()["lr"] == chosen
