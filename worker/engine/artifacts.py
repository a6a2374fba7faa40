"""The export format, in one place: the files of an exported model folder, the names of its
ONNX graph's input and output, and the reading of its `config.json` into a typed object.

The writer is `export.py` (and `onnx_export.py` for `model.onnx`); the readers are the
predictor, the inference service and the worker. Standard library only, so anything may import
it without the training stack.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .recipe import ORIGINAL_VIEW

FORMAT = "thaw/1"
"""The `format` field of `config.json` (and the safetensors metadata) this code reads and writes."""

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
ONNX_FILE = "model.onnx"
LABELS_FILE = "labels.json"
CARD_FILE = "card.md"

ONNX_INPUT = "images"
ONNX_OUTPUT = "logits"
ONNX_FEATURES = "features"
"""The pooled backbone features, a second output of `model.onnx` (what monitoring tests for
shift); a `model.onnx` exported before it has only `logits`."""
"""The ONNX graph's one input (a float batch, NCHW, preprocessed) and one output (the newest
task's logits)."""
ONNX_TEXT_INPUTS = ("input_ids", "attention_mask")

"""A text model's ONNX inputs: int64 (batch, length) each, both axes dynamic."""


class ModelConfigError(ValueError):
    """A folder's `config.json` is missing, unreadable, or not a thaw model config."""


@dataclass(frozen=True)
class Preprocessing:
    """How images were prepared in training, and so must be prepared for inference."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "bilinear"
    color: str = "RGB"
    tta: tuple[str, ...] = (ORIGINAL_VIEW,)
    """Test-time augmentation: the views (`pixels.view_pixels`) whose probabilities predict
    averages, as the final validation did (`config.json`'s `preprocessing.tta`)."""


@dataclass(frozen=True)
class TextPreprocessing:
    """How texts were tokenized in training, and so must be for inference (see `tokens.py`)."""

    tokenizer: str
    """The tokenizer file in the model folder."""
    max_length: int
    truncation: str
    pooling: str
    special_tokens: dict[str, int]
    """`cls_id`, `sep_id`, `pad_id`, `mask_id`."""


@dataclass(frozen=True)
class ExportedTask:
    name: str
    labels: tuple[str, ...]
    head: dict[str, Any]
    """The head's shape as the plan serialises it (`HeadConfig` fields)."""


@dataclass(frozen=True)
class ModelConfig:
    """An exported model's `config.json`, read."""

    tasks: tuple[ExportedTask, ...]
    """Oldest first; the last is the model's own (newest) task, answered by default. A
    Learning-without-Forgetting model keeps its parents' tasks before it."""
    preprocessing: Preprocessing | None
    """An image model's; None for text (see `text`)."""
    plan: dict[str, Any]
    """The training plan as `Plan.to_dict()` wrote it."""
    temperature: float = 1.0
    """The newest task's logits are divided by this before the softmax for calibrated
    probabilities (`config.json`'s `calibration.temperature`; 1 where it has none)."""
    text: TextPreprocessing | None = None
    """A text model's tokenization; None for images."""
    encoder: dict[str, Any] | None = None
    """A text model's `transformers` encoder config (its architecture, without weights)."""

    @property
    def modality(self) -> str:
        return "text" if self.text is not None else "image"

    @property
    def image(self) -> Preprocessing:
        """The image preprocessing; ModelConfigError for a text model."""
        if self.preprocessing is None:
            raise ModelConfigError("a text model takes texts, not images")
        return self.preprocessing

    @property
    def newest(self) -> ExportedTask:
        return self.tasks[-1]

    @property
    def labels(self) -> tuple[str, ...]:
        """The newest task's labels."""
        return self.newest.labels

    def temperatures(self) -> list[float]:
        """Per task, oldest first: the newest task's fitted temperature, 1 for older ones
        (their heads were calibrated, if at all, in their own model)."""
        return [1.0] * (len(self.tasks) - 1) + [self.temperature]

    def task_labels(self) -> dict[str, list[str]]:
        """Labels per task name, oldest first."""
        return {task.name: list(task.labels) for task in self.tasks}


def parse_model_config(data: dict[str, Any], *, source: str = CONFIG_FILE) -> ModelConfig:
    """Read a `config.json` already parsed as JSON; `source` names it in errors."""
    if data.get("format") != FORMAT:
        raise ModelConfigError(f"{source}: unsupported model format {data.get('format')!r}")
    try:
        plan: dict[str, Any] = data["plan"]
        labels = tuple(data["labels"])
        prep = data["preprocessing"]
        preprocessing, text, encoder = None, None, None
        # Read by the format's own key, not the modality registry: MLflow exports ship this
        # module alone (`service/models/export.py`).
        if prep.get("modality") == "text":
            text = TextPreprocessing(
                tokenizer=str(prep["tokenizer"]),
                max_length=int(prep["max_length"]),
                truncation=str(prep["truncation"]),
                pooling=str(prep["pooling"]),
                special_tokens={key: int(value) for key, value in prep["special_tokens"].items()},
            )
            encoder = dict(data["architecture"]["encoder"])
        else:
            preprocessing = Preprocessing(
                image_size=int(prep["image_size"]),
                mean=_triple(prep["mean"]),
                std=_triple(prep["std"]),
                resize=prep.get("resize", "bilinear"),
                color=prep.get("color", "RGB"),
                tta=_views(prep.get("tta", [ORIGINAL_VIEW])),
            )
        # Heads come from the plan; the listed `tasks` (present only with old tasks) give the
        # labels in the order the model's heads answer them.
        heads = {task["name"]: task["head"] for task in plan.get("old_tasks", ())}
        own_name = plan.get("task_name", "main")
        heads[own_name] = plan["head"]
        listed = data.get("tasks") or [{"name": own_name, "labels": labels}]
        tasks = tuple(
            ExportedTask(name=task["name"], labels=tuple(task["labels"]), head=heads[task["name"]])
            for task in listed
        )
        temperature = float((data.get("calibration") or {}).get("temperature", 1.0))
        if not temperature > 0:
            raise ValueError(f"calibration temperature must be positive; got {temperature}")
    except (KeyError, TypeError, ValueError) as error:
        raise ModelConfigError(f"{source}: not a thaw model config ({error!r})") from None
    return ModelConfig(
        tasks=tasks,
        preprocessing=preprocessing,
        plan=plan,
        temperature=temperature,
        text=text,
        encoder=encoder,
    )


def read_model_config(model_dir: Path) -> ModelConfig:
    """Read `model_dir/config.json`; ModelConfigError names the file when it cannot."""
    path = model_dir / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ModelConfigError(f"cannot read an exported model's {path}: {error}") from None
    if not isinstance(data, dict):
        raise ModelConfigError(f"{path}: not a thaw model config")
    return parse_model_config(data, source=str(path))


def _views(values: Any) -> tuple[str, ...]:
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise ValueError(f"preprocessing.tta must list view names; got {values!r}")
    return tuple(values)


def _triple(values: Any) -> tuple[float, float, float]:
    first, second, third = (float(value) for value in values)
    return (first, second, third)
