"""`thaw experiments create -f exp.yaml --watch` and `show`, against the API in this process,
with a worker thread running the trials' jobs while the command watches."""

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from rich.console import Console
from sqlalchemy import select
from typer.testing import CliRunner

import service.client
from service.cli import app
from service.cli import experiments as experiments_cli
from service.context import AppContext
from service.experiments.schemas import EXPERIMENT_OUT_EXAMPLE, ExperimentOut
from service.tables import Job
from tests.test_strategies_api import digits_dataset
from worker import jobs


@pytest.fixture
def worker_thread(context: AppContext) -> Iterator[None]:
    """Runs every queued job until the test ends, as a worker process would."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            with context.db.session() as session:
                queued = session.scalars(
                    select(Job.id).where(Job.status == "queued").order_by(Job.created_at)
                ).first()
            if queued is None:
                stop.wait(0.1)
            else:
                jobs.execute(context, job_id=queued)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(timeout=60)


def test_create_watch_show_and_promote(
    client: TestClient,
    context: AppContext,
    auth: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    worker_thread: None,
) -> None:
    real_client = service.client.ThawClient

    def in_process(url: str, *, api_key: str | None, **_: Any) -> Any:
        """A ThawClient whose requests go to this process's app."""
        thaw = real_client(url, api_key=api_key)
        thaw._http.close()
        thaw._http = TestClient(
            client.app, base_url=url, headers={"Authorization": f"Bearer {api_key}"}
        )
        return thaw

    monkeypatch.setattr(service.client, "ThawClient", in_process)
    monkeypatch.setattr(experiments_cli, "WATCH_SECONDS", 0.2)
    dataset = digits_dataset(client, context, auth, [0, 1])
    spec = tmp_path / "exp.yaml"
    spec.write_text(
        "model: cli-exp\n"
        "base_models: [efficientnet_lite0]\n"
        "strategies: [scratch, feature_extraction]\n"
        "settings: {epochs: 1, batch_size: 16, lr: 0.01, image_size: 64}\n"
        "budget: {max_parallel: 1}\n"
    )
    key = auth["Authorization"].removeprefix("Bearer ")
    runner = CliRunner()
    common = ["--url", "http://testserver", "--api-key", key]

    created = runner.invoke(
        app, ["experiments", "create", "-f", str(spec), "--dataset", dataset, "--watch", *common]
    )
    assert created.exit_code == 0, created.output
    assert "feature_extraction" in created.output
    assert "diagnosis" in created.output
    exp_id = created.output.split("experiment ", 1)[1].split(":", 1)[0]

    shown = runner.invoke(app, ["experiments", "show", exp_id, "--json", *common])
    assert shown.exit_code == 0, shown.output
    experiment = json.loads(shown.output)
    assert experiment["status"] == "succeeded"
    assert [row["status"] for row in experiment["leaderboard"]] == ["succeeded"] * 2

    promoted = runner.invoke(app, ["experiments", "promote", exp_id, *common])
    assert promoted.exit_code == 0, promoted.output
    leader = experiment["leaderboard"][0]
    assert f"cli-exp:production → version {leader['version']}" in promoted.output

    missing = runner.invoke(app, ["experiments", "show", "exp_missing", *common])
    assert missing.exit_code == 1
    assert "experiment_not_found" in missing.output


def rendered(experiment: ExperimentOut) -> list[list[str]]:
    """The leaderboard table's header and rows, cell by cell."""
    console = Console(record=True, width=400)
    console.print(experiments_cli._leaderboard(experiment))
    # Rich draws the header's borders heavy (┃), the rows' light (│).
    text = console.export_text().replace("┃", "│")
    lines = [line for line in text.splitlines() if "│" in line]
    return [[cell.strip() for cell in line.strip("│ ").split("│")] for line in lines]


def test_show_has_the_old_task_columns_for_an_experiment_from_a_registered_model() -> None:
    """The literature's old-task columns, in the CLI's table when the trials have a parent."""
    from_parent = ExperimentOut.model_validate(
        {
            **EXPERIMENT_OUT_EXAMPLE,
            "request": {**EXPERIMENT_OUT_EXAMPLE["request"], "base_models": ["model:old:1"]},
            "leaderboard": [
                {
                    **row,
                    "base_model": "model:old:1",
                    "old_task_accuracy": accuracy,
                    "old_task_change": change,
                }
                for row, accuracy, change in zip(
                    EXPERIMENT_OUT_EXAMPLE["leaderboard"],
                    [0.912, 0.5],
                    [-0.021, -0.433],
                    strict=True,
                )
            ],
        }
    )
    rows = rendered(from_parent)
    header = rows[0]
    old_task = [row[header.index("old-task acc %")] for row in rows[1:]]
    change = [row[header.index("old-task change (points)")] for row in rows[1:]]
    assert old_task == ["91.2", "50.0"]
    assert change == ["-2.1", "-43.3"]

    plain = rendered(ExperimentOut.model_validate(EXPERIMENT_OUT_EXAMPLE))
    assert not [column for column in plain[0] if column.startswith("old-task")]
