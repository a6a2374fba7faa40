"""Write a trained model as a self-describing folder: safetensors weights + config.json."""

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from .artifacts import CONFIG_FILE, FORMAT, WEIGHTS_FILE
from .calibration import Calibration
from .plan import Plan
from .train import TrainingResult
from .zoo import get_base_model_info

# The names are re-exported for callers that write or check exported folders.
__all__ = ["CONFIG_FILE", "FORMAT", "WEIGHTS_FILE", "export_model", "model_config"]


def model_config(
    plan: Plan, labels: list[str], calibration: Calibration | None = None
) -> dict[str, Any]:
    """Everything needed to rebuild the model and preprocess images exactly as in training.

    An LwF model also lists its `tasks`, oldest first; the newest is the default one and
    the one `labels` describes. `calibration` holds the newest task's temperature.
    """
    config: dict[str, Any] = {
        "format": FORMAT,
        "architecture": {
            "base_model": plan.base_model,
            "family": get_base_model_info(plan.base_model).family,
            "head": asdict(plan.head),
            "num_classes": plan.num_classes,
        },
        "labels": labels,
        "preprocessing": {
            "image_size": plan.image_size,
            "mean": list(plan.mean),
            "std": list(plan.std),
            "resize": "bilinear",
            "color": "RGB",
        },
        "plan": plan.to_dict(),
    }
    if calibration is not None:
        config["calibration"] = calibration.to_dict()
    if plan.old_tasks:
        config["tasks"] = [
            *({"name": task.name, "labels": list(task.labels)} for task in plan.old_tasks),
            {"name": plan.task_name, "labels": labels},
        ]
    return config


def export_model(result: TrainingResult, plan: Plan, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    weights_path = out_dir / WEIGHTS_FILE
    config_path = out_dir / CONFIG_FILE
    # safetensors refuses views and non-contiguous tensors; the copy also leaves the device.
    state = {
        name: tensor.detach().cpu().contiguous()
        for name, tensor in result.model.state_dict().items()
    }
    save_file(state, weights_path, metadata={"format": FORMAT})
    config = model_config(plan, result.metrics["classes"], result.calibration)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return {"weights": weights_path, "config": config_path}
