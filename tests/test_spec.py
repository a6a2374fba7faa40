"""The transfer settings are declared once (worker/engine/spec.py): the HTTP schema, the engine's
config and the stored plan must list the same settings with the same defaults and bounds."""

import json
import subprocess
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.context import AppContext
from service.jobs.schemas import JobFields, JobSpec
from tests.test_api import assert_error, ready_dataset
from worker.engine import Plan, TransferConfig, compile_plan
from worker.engine.spec import (
    RunSettings,
    TransferSettings,
    check_settings,
    decode,
    settings_of,
)

PUBLIC = [item for item, declared in settings_of(TransferSettings) if declared.public]


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: v.__dict__))


def test_openapi_schema_lists_every_public_setting_with_its_default() -> None:
    properties = JobSpec.model_json_schema()["properties"]

    assert set(properties) == {item.name for item in PUBLIC} | set(JobFields.model_fields)
    for item in PUBLIC:
        assert properties[item.name]["default"] == _json(item.default), item.name


def test_engine_config_takes_every_setting_and_its_default_from_the_declaration() -> None:
    config_defaults = {item.name: item.default for item in fields(TransferConfig)}

    for item, _ in settings_of(TransferSettings):
        assert config_defaults[item.name] == item.default, item.name
    # What the config adds is what only the engine knows: the classes, the training split's
    # size and the parent.
    assert set(config_defaults) - {item.name for item, _ in settings_of(TransferSettings)} == {
        "num_classes",
        "parent",
        "train_size",
    }


def test_a_plan_carries_the_run_settings_and_fills_old_plans_with_their_defaults() -> None:
    plan = compile_plan(TransferConfig(base_model="resnet18", strategy="fine_tune", num_classes=2))
    stored = plan.to_dict()
    run_settings = [item for item, _ in settings_of(RunSettings)]
    # A setting the data decides when left out (`data_defaults`) is stored resolved: the
    # plan's own default is what an old plan without it gets.
    plan_defaults = {item.name: item.default for item in fields(Plan)}

    for item in run_settings:
        expected = item.default if item.default is not None else plan_defaults[item.name]
        assert stored[item.name] == expected, item.name
        assert item.default is not MISSING
    for item in run_settings:
        del stored[item.name]
    assert Plan.from_dict(stored) == plan


def test_the_api_spec_maps_onto_the_engine_config_field_for_field() -> None:
    body = {
        "dataset": "ds_1",
        "model": "m",
        "lr": 0.02,
        "head": {"hidden": [8], "dropout": 0.1},
        "stages": [{"groups": ["top:1"], "epochs": 2, "lrs": {"head": 0.1}}],
        "progressive_resizing": [64, 96],
        "image_size": 96,
    }
    settings = JobSpec.model_validate(body).transfer_settings()

    assert settings.lr == 0.02
    assert settings.head.hidden == (8,)
    assert settings.stages is not None
    assert settings.stages[0].groups == ("top:1",)
    assert settings.progressive_resizing == (64, 96)
    check_settings(settings)


BOUNDARY_CASES = [
    ("epochs", 0),
    ("epochs", 1001),
    ("lr", 0.0),
    ("lr", 10.5),
    ("image_size", 63),
    ("image_size", 1025),
    ("label_smoothing", 1.0),
    ("lwf_temperature", 0.0),
    ("partial_groups", 0),
    ("batch_size", 0),
    ("head", {"hidden": [0]}),
    ("head", {"dropout": 1.0}),
    ("progressive_resizing", [32, 64]),
    ("stages", [{"epochs": 0}]),
    ("stages", [{"image_size": 2048}]),
    ("stages", [{"lrs": {"head": 0.0}}]),
    ("stages", [{"groups": []}]),
    ("task_name", "Not A Name"),
    ("strategy", "linear_probe"),
]


@pytest.mark.parametrize(("name", "value"), BOUNDARY_CASES)
def test_http_schema_and_engine_refuse_the_same_values(name: str, value: Any) -> None:
    body = {"dataset": "ds_1", "model": "m", name: value}
    with pytest.raises(ValidationError):
        JobSpec.model_validate(body)

    # The engine, handed the same value without pydantic in front, refuses it too.
    valid = JobSpec.model_validate({"dataset": "ds_1", "model": "m"}).transfer_settings()
    data = _json(valid)
    data[name] = value if not isinstance(value, dict) else {**data[name], **value}
    with pytest.raises(ValueError, match=name):
        check_settings(decode(TransferSettings, data))


def test_validating_a_spec_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import service.jobs.schemas as schemas\n"
        "schemas.JobSpec.model_validate({'dataset': 'ds_1', 'model': 'm'})\n"
        "loaded = sorted(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules)\n"
        "print(','.join(loaded) or 'none')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "none"


def test_a_plan_preview_needs_no_model_name(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    dataset = ready_dataset(client, context, auth, classes=2, per_class=6)
    spec = {"dataset": dataset, "strategy": "fine_tune", "image_size": 64}

    preview = client.post("/v1/jobs/plan", headers=auth, json=spec)
    assert preview.status_code == 200, preview.text
    assert preview.json()["plan"]["task_name"] == "main"
    named = client.post("/v1/jobs/plan", headers=auth, json={**spec, "model": "digits"})
    assert named.json()["plan"]["task_name"] == "digits"
    # A job still needs the registry name it publishes under.
    job = client.post("/v1/jobs", headers=auth, json=spec)
    assert_error(job, 422, "invalid_request", "model")


def test_the_api_process_starts_and_answers_without_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "from service.cli import migrate_database\n"
        "from service.main import create_app\n"
        "from service.settings import Settings\n"
        f"settings = Settings(data_dir={str(tmp_path)!r})\n"
        "migrate_database(settings)\n"
        "with TestClient(create_app(settings)) as client:\n"
        "    assert client.get('/readyz').status_code == 200\n"
        "    assert client.get('/openapi.json').status_code == 200\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    # Idle, the API holds no training stack (800 MB resident with it, about 130 MB without).
    assert done.stdout.strip().splitlines()[-1] == "False"
