"""The export format's one reader: tasks with their labels and heads, preprocessing, the plan."""

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pytest

from worker.engine import TransferConfig, compile_plan
from worker.engine.artifacts import (
    CONFIG_FILE,
    ModelConfigError,
    read_model_config,
)
from worker.engine.export import model_config
from worker.engine.modalities.image.exported import ExportedImagePreprocessing
from worker.engine.modalities.image.preprocessing import ImagePreprocessing


def as_json(value: object) -> object:
    """What a value reads back as from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


def test_a_single_task_model_reads_back_what_export_wrote(
    tmp_path: Path, make_config: Callable[..., TransferConfig]
) -> None:
    plan = compile_plan(make_config(image_size=96, task_name="colours"))
    (tmp_path / CONFIG_FILE).write_text(json.dumps(model_config(plan, ["red", "green", "blue"])))

    config = read_model_config(tmp_path)

    assert [task.name for task in config.tasks] == ["colours"]
    assert config.labels == ("red", "green", "blue")
    assert config.newest.head == as_json(asdict(plan.head))
    pixels = ImagePreprocessing.of(plan)
    assert config.preprocessing == ExportedImagePreprocessing(
        image_size=96, mean=pixels.mean, std=pixels.std
    )
    assert config.plan == as_json(plan.to_dict())


def test_an_lwf_model_lists_its_parents_tasks_first_with_their_heads(
    tmp_path: Path, make_config: Callable[..., TransferConfig], parent_dir: Path
) -> None:
    plan = compile_plan(
        make_config("lwf", parent_dir=parent_dir, pretrained=True, task_name="colours")
    )
    (tmp_path / CONFIG_FILE).write_text(json.dumps(model_config(plan, ["red", "green", "blue"])))

    config = read_model_config(tmp_path)

    assert config.task_labels() == {
        "shapes": ["circle", "square"],
        "colours": ["red", "green", "blue"],
    }
    (old,) = plan.old_tasks
    assert config.tasks[0].head == as_json(asdict(old.head))
    assert config.newest.head == as_json(asdict(plan.head))


def test_a_folder_that_is_not_a_model_says_which_file(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match=r"config\.json"):
        read_model_config(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"format": "thaw/1", "labels": ["a"]}))
    with pytest.raises(ModelConfigError, match="not a thaw model config"):
        read_model_config(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(ModelConfigError, match="unsupported model format 'other/9'"):
        read_model_config(tmp_path)
