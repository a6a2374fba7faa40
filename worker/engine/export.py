"""Write a trained model as a self-describing folder: safetensors weights + config.json, and
`export_bundle`: the whole version folder (those, the labels and the checked ONNX model)."""

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from .artifacts import CONFIG_FILE, FORMAT, LABELS_FILE, ONNX_FILE, WEIGHTS_FILE
from .calibration import Calibration
from .modalities import modality_for
from .onnx_export import OnnxExport
from .plan import Plan
from .strategies import strategy_of
from .train import TrainingResult
from .zoo import get_base_model_info

# The names are re-exported for callers that write or check exported folders.
__all__ = [
    "CONFIG_FILE",
    "FORMAT",
    "WEIGHTS_FILE",
    "Bundle",
    "export_bundle",
    "export_model",
    "model_config",
]


def model_config(
    plan: Plan,
    labels: list[str],
    *,
    files: dict[str, Any] | None = None,
    calibration: Calibration | None = None,
) -> dict[str, Any]:
    """Everything needed to rebuild the model and preprocess its inputs exactly as in training.

    An LwF model also lists its `tasks`, oldest first; the newest is the default one and
    the one `labels` describes. `files` are the entries of what the modality exported beside
    the weights (`Modality.export_files`: a text model's tokenizer and encoder). `calibration`
    holds the newest task's temperature.
    """
    architecture: dict[str, Any] = {
        "base_model": plan.base_model,
        "family": get_base_model_info(plan.base_model).family,
        "head": asdict(plan.head),
        "num_classes": plan.num_classes,
    }
    own, preprocessing = modality_for(plan.modality).config_entries(plan, files or {})
    architecture |= own
    config: dict[str, Any] = {
        "format": FORMAT,
        "architecture": architecture,
        "labels": labels,
        "preprocessing": preprocessing,
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


def export_model(
    result: TrainingResult, plan: Plan, out_dir: Path, *, weights_dir: Path | None = None
) -> dict[str, Path]:
    """Write weights and config.json (and a text model's tokenizer files) into `out_dir`;
    `result.model` then becomes the model as served (`Strategy.for_inference`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = modality_for(plan.modality).export_files(plan, out_dir, weights_dir)
    weights_path = out_dir / WEIGHTS_FILE
    config_path = out_dir / CONFIG_FILE
    # safetensors refuses views and non-contiguous tensors; the copy also leaves the device.
    state = {
        name: tensor.detach().cpu().contiguous()
        for name, tensor in strategy_of(plan).export_state(result.model, plan).items()
    }
    save_file(state, weights_path, metadata={"format": FORMAT})
    config = model_config(
        plan, result.metrics["classes"], files=files, calibration=result.calibration
    )
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    # From here on the model is the one served and exported to ONNX (adapters merged).
    result.model = strategy_of(plan).for_inference(result.model)
    return {"weights": weights_path, "config": config_path}


@dataclass(frozen=True)
class Bundle:
    """What `export_bundle` wrote besides the files `export_model` always writes."""

    onnx: OnnxExport | None
    """The ONNX export and its parity check; None when ONNX was not asked for."""


def export_bundle(
    result: TrainingResult,
    plan: Plan,
    out_dir: Path,
    *,
    classes: list[str],
    weights_dir: Path | None = None,
    onnx: bool = True,
) -> Bundle:
    """Write a version's whole folder: weights, config.json (a text model's tokenizer files),
    the labels and, when `onnx`, `model.onnx` checked against PyTorch. `result.model` is then
    the model as served, as after `export_model`."""
    export_model(result, plan, out_dir, weights_dir=weights_dir)
    (out_dir / LABELS_FILE).write_text(json.dumps(classes, indent=2) + "\n")
    return Bundle(onnx=_export_onnx(result.model, plan, out_dir / ONNX_FILE) if onnx else None)


def _export_onnx(model: Any, plan: Plan, out_path: Path) -> OnnxExport:
    return modality_for(plan.modality).export_onnx(model, plan, out_path)
