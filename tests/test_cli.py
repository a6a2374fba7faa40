"""The `thaw` client commands, run as real processes against one live `thaw serve`."""

import json
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import digits_split, png_bytes
from tests.test_e2e import create_key, free_port, running, thaw_env, wait_ready

THAW = str(Path(sys.executable).parent / "thaw")
SPEC_YAML = """\
model: cli-digits
base_model: efficientnet_lite0
strategy: feature_extraction
epochs: 2
batch_size: 16
lr: 0.01
image_size: 64
seed: 3
solve_head: false
"""


@dataclass
class Server:
    url: str
    key: str
    env: dict[str, str]
    folder: Path
    """A dataset folder: three digit classes, one sub-folder each."""
    held_out: Path
    """An image of a 1 that is not in the folder."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("cli")
    env = thaw_env(root / "data")
    key = create_key(env, "cli")["Authorization"].removeprefix("Bearer ")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    pool, held_out = digits_split()
    folder = root / "digits"
    for index, (image, label) in enumerate(item for item in pool if item[1] < 3):
        if index < 45:
            (folder / f"d{label}").mkdir(parents=True, exist_ok=True)
            (folder / f"d{label}" / f"{index}.png").write_bytes(png_bytes(image))
    one = root / "one.png"
    one.write_bytes(png_bytes(next(image for image, label in held_out if label == 1)))
    log = root / "serve.log"
    with running([THAW, "serve", "--port", str(port)], env, log) as process:
        wait_ready(url, process, log)
        yield Server(url=url, key=key, env={**env, "THAW_URL": url}, folder=folder, held_out=one)


def thaw(
    server: Server, *args: str, key: bool = True, ok: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {**server.env, **({"THAW_API_KEY": server.key} if key else {})}
    done = subprocess.run(
        [THAW, *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    if ok:
        assert done.returncode == 0, f"{args}: rc {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def thaw_json(server: Server, *args: str) -> Any:
    return json.loads(thaw(server, *args, "--json").stdout)


@pytest.fixture(scope="module")
def dataset(server: Server) -> dict[str, Any]:
    done = thaw(server, "datasets", "upload", str(server.folder), "--wait", "--json")
    # The progress bar goes to stderr (stdout stays parseable) and reaches the archive's size.
    assert "upload" in done.stderr
    assert "kB" in done.stderr
    shown: dict[str, Any] = json.loads(done.stdout)
    return shown


def test_upload_a_folder_with_progress(server: Server, dataset: dict[str, Any]) -> None:
    assert dataset["status"] == "ready", dataset
    assert dataset["name"] == "digits"
    assert dataset["classes"] == ["d0", "d1", "d2"]
    assert dataset["num_images"] == 45
    shown = thaw_json(server, "datasets", "show", dataset["id"])
    assert shown["id"] == dataset["id"]
    assert [d["id"] for d in thaw_json(server, "datasets", "ls")] == [dataset["id"]]
    table = thaw(server, "datasets", "show", dataset["id"]).stdout
    assert "d1" in table
    assert "ready" in table


def test_watch_a_job_to_completion_then_use_the_model(
    server: Server, dataset: dict[str, Any], tmp_path: Path
) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC_YAML)
    plan = thaw_json(server, "jobs", "plan", "-f", str(spec), "--dataset", dataset["id"])
    assert [stage["epochs"] for stage in plan["stages"]] == [2]

    done = thaw(server, "jobs", "create", "-f", str(spec), "--dataset", dataset["id"], "--watch")
    assert "status: succeeded" in done.stderr
    assert "epoch 2 (#2)" in done.stderr
    assert "val_accuracy" in done.stderr
    assert "succeeded" in done.stdout  # the final job table

    [job] = thaw_json(server, "jobs", "ls")
    assert job["status"] == "succeeded"
    assert job["eta_seconds"] == 0.0
    logs = thaw(server, "jobs", "logs", job["id"], "--json").stdout.splitlines()
    assert [json.loads(line)["kind"] for line in logs] == [
        "status",
        "status",
        "epoch",
        "epoch",
        "status",
    ]

    [model] = thaw_json(server, "models", "ls")
    assert model["name"] == "cli-digits"
    assert model["latest_version"]["version"] == 1
    version = thaw_json(server, "models", "show", "cli-digits:1")
    assert version["job_id"] == job["id"]
    alias = thaw_json(server, "models", "alias", "cli-digits", "production", "1")
    assert alias["version"] == 1
    downloaded = thaw_json(
        server,
        "models",
        "download",
        "cli-digits:production",
        "--artifact",
        "config.json",
        "-o",
        str(tmp_path / "out"),
    )
    assert json.loads((tmp_path / "out" / "config.json").read_text())
    assert downloaded["files"] == [str(tmp_path / "out" / "config.json")]
    archive = tmp_path / "triton.zip"
    exported = thaw_json(
        server,
        "models",
        "export",
        "cli-digits:production",
        "--format",
        "triton",
        "-o",
        str(archive),
    )
    assert exported == {"model": "cli-digits", "version": 1, "file": str(archive)}
    assert "cli-digits/config.pbtxt" in zipfile.ZipFile(archive).namelist()

    answer = thaw_json(server, "predict", "cli-digits", str(server.held_out), "--top-k", "2")
    assert answer["version"] == 1
    [prediction] = answer["predictions"]
    assert prediction["image"] == "one.png"
    assert len(prediction["top"]) == 2


def test_watch_exits_nonzero_when_the_job_is_cancelled(
    server: Server, dataset: dict[str, Any], tmp_path: Path
) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps({"model": "cli-long", "strategy": "fine_tune", "epochs": 200, "image_size": 64})
    )
    watcher = subprocess.Popen(
        [THAW, "jobs", "create", "-f", str(spec), "--dataset", dataset["id"], "--watch"],
        env={**server.env, "THAW_API_KEY": server.key},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    headers = {"Authorization": f"Bearer {server.key}"}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        jobs = httpx.get(f"{server.url}/v1/jobs", headers=headers).json()["data"]
        running_jobs = [j for j in jobs if j["model_name"] == "cli-long"]
        if running_jobs and running_jobs[0]["status"] == "running":
            break
        time.sleep(0.5)
    else:
        watcher.kill()
        pytest.fail("the job never started")
    thaw(server, "jobs", "cancel", running_jobs[0]["id"])
    _, stderr = watcher.communicate(timeout=120)
    assert watcher.returncode == 2, stderr
    assert "status: cancelled" in stderr


def test_errors_are_messages_not_tracebacks(server: Server) -> None:
    unauthorized = thaw(server, "jobs", "ls", key=False, ok=False)
    assert unauthorized.returncode == 1
    assert "401 unauthorized" in unauthorized.stderr
    assert "Traceback" not in unauthorized.stderr
    missing = thaw(server, "jobs", "show", "job_nope", ok=False)
    assert missing.returncode == 1
    assert "job_not_found" in missing.stderr
    down = thaw(server, "datasets", "ls", "--url", "http://127.0.0.1:9", ok=False)
    assert down.returncode == 1
    assert "cannot reach" in down.stderr


def test_lr_find_draws_the_curve_or_saves_the_plot(
    server: Server, dataset: dict[str, Any], tmp_path: Path
) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC_YAML.replace("feature_extraction", "freeze_unfreeze"))
    drawn = thaw(server, "jobs", "lr-find", "-f", str(spec), "--dataset", dataset["id"])
    assert "status: succeeded" in drawn.stderr
    lines = drawn.stdout.splitlines()
    assert lines[0].strip() == "v"  # the suggestion's column
    assert sum(line.count("*") for line in lines) >= 20
    assert "1e-07" in drawn.stdout
    assert "suggested rate for stage head:" in lines[-1]

    plot = tmp_path / "curve.svg"
    saved = thaw(
        server, "jobs", "lr-find", "-f", str(spec), "--dataset", dataset["id"], "--plot", str(plot)
    )
    assert plot.read_text().startswith("<?xml")
    assert "suggestion" in plot.read_text()
    assert "*" not in saved.stdout
    # Deterministic: both runs suggest the same rate.
    assert saved.stdout.splitlines()[-1] == lines[-1]
