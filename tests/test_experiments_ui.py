"""The dashboard's experiment pages, rendered server-side: the list, and one experiment with its
leaderboard, diagnosis lines and overlaid curves; another team sees neither."""

import re

from fastapi.testclient import TestClient

from service.context import AppContext
from tests.conftest import new_key
from tests.test_experiments import experiment_request, run_trials
from tests.test_strategies_api import digits_dataset


def signed_in(headers: dict[str, str]) -> dict[str, str]:
    return {"Cookie": f"thaw_key={headers['Authorization'].removeprefix('Bearer ')}"}


def test_experiment_pages_show_the_leaderboard_diagnosis_and_curves(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    dataset = digits_dataset(client, context, auth, [0, 1, 2])
    request = experiment_request(
        dataset,
        strategies=["scratch", "feature_extraction"],
        settings={"epochs": 2, "batch_size": 16, "lr": 0.01, "image_size": 64, "seed": 1},
    )
    created = client.post("/v1/experiments", headers=auth, json=request).json()
    exp_id = created["id"]
    page = signed_in(auth)

    running = client.get(f"/ui/experiments/{exp_id}", headers=page)
    assert running.status_code == 200, running.text
    # Still running: the page follows the experiment's events from the last one it shows.
    assert "events/stream?after=" in running.text
    assert 'id="cancel"' in running.text

    experiment = run_trials(client, context, auth, created)
    assert experiment["status"] == "succeeded", experiment["trials"]

    listing = client.get("/ui/experiments", headers=page)
    assert listing.status_code == 200
    assert f'href="/ui/experiments/{exp_id}"' in listing.text
    assert "succeeded" in listing.text

    shown = client.get(f"/ui/experiments/{exp_id}", headers=page).text
    rows = re.findall(r'<tr data-trial="(trl_[^"]+)">', shown)
    # The leaderboard in the API's order, each row linking to its trial's job.
    assert rows == [row["trial_id"] for row in experiment["leaderboard"]]
    for row in experiment["leaderboard"]:
        assert f'href="/ui/jobs/{row["job_id"]}"' in shown
        assert f"{row['test_accuracy'] * 100:.1f}%" in shown
    for line in experiment["diagnosis"]["summary"]:
        assert line.replace("'", "&#39;") in shown
    assert f'src="/ui/api/v1/experiments/{exp_id}/plots/curves.svg"' in shown
    assert 'id="promote"' in shown
    assert "old task" not in shown  # no parent model, so no old-task columns
    assert "events/stream" not in shown  # ended: nothing to follow

    # Another team: not in its list, and the page is the "Not found" page.
    intruder = signed_in(new_key(context, "team-b"))
    assert exp_id not in client.get("/ui/experiments", headers=intruder).text
    hidden = client.get(f"/ui/experiments/{exp_id}", headers=intruder)
    assert hidden.status_code == 404
    assert "Not found" in hidden.text
    assert exp_id in hidden.text  # only as the id it was asked for
    assert "scratch" not in hidden.text
