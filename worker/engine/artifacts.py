"""The export format, in one place: the files of an exported model folder, the names of its
ONNX graph's input and output, and the reading of its `config.json` into a typed object.

The writer is `export.py` (and `onnx_export.py` for `model.onnx`); the readers are the
predictor, the inference service and the worker. Standard library only, so anything may import
it without the training stack; `preprocessing` is read as its modality's kind, found through
the registry when it is read (MLflow exports ship this module without it, and name the kinds).
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

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
class ExportedPreprocessing:
    """How an exported model's items become its input, as `config.json`'s `preprocessing`
    holds it, of its modality's own kind: each modality subclasses this in its folder
    (`modalities/<name>/exported.py`, standard library only, shipped with MLflow exports;
    its `Modality.exported`), so `ModelConfig` carries no field of one modality."""

    modality: ClassVar[str]
    """The modality's name (`Modality.name`), the `modality` tag of `preprocessing`."""
    untagged: ClassVar[bool] = False
    """True for the one kind a `preprocessing` without a `modality` tag is (images: every
    `config.json` of theirs is written so)."""

    @classmethod
    def from_config(cls, data: dict[str, Any]) -> Self:
        """This kind read from a whole `config.json` (parsed as JSON)."""
        raise NotImplementedError

    @classmethod
    def of(cls, config: "ModelConfig") -> Self:
        """`config`'s preprocessing, which must be of this kind (ModelConfigError otherwise)."""
        if not isinstance(config.preprocessing, cls):
            raise ModelConfigError(
                f"this {config.modality} model takes {config.modality}s, not {cls.modality}s"
            )
        return config.preprocessing


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
    preprocessing: ExportedPreprocessing
    """Of the model's modality's own kind; its tag is the model's `modality`."""
    plan: dict[str, Any]
    """The training plan as `Plan.to_dict()` wrote it."""
    temperature: float = 1.0
    """The newest task's logits are divided by this before the softmax for calibrated
    probabilities (`config.json`'s `calibration.temperature`; 1 where it has none)."""

    @property
    def modality(self) -> str:
        """A name in the modality registry (`modalities.MODALITIES`)."""
        return self.preprocessing.modality

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


def parse_model_config(
    data: dict[str, Any],
    *,
    source: str = CONFIG_FILE,
    kinds: Sequence[type[ExportedPreprocessing]] | None = None,
) -> ModelConfig:
    """Read a `config.json` already parsed as JSON; `source` names it in errors. `kinds`: the
    modalities' kinds of `preprocessing`, the registry's (`Modality.exported`) unless given
    (an MLflow export's loader, shipped without the registry, gives its own)."""
    if data.get("format") != FORMAT:
        raise ModelConfigError(f"{source}: unsupported model format {data.get('format')!r}")
    try:
        plan: dict[str, Any] = data["plan"]
        labels = tuple(data["labels"])
        preprocessing = _preprocessing_kind(data["preprocessing"], kinds).from_config(data)
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
    return ModelConfig(tasks=tasks, preprocessing=preprocessing, plan=plan, temperature=temperature)


def _preprocessing_kind(
    stored: dict[str, Any], kinds: Sequence[type[ExportedPreprocessing]] | None
) -> type[ExportedPreprocessing]:
    """The kind of a `config.json`'s `preprocessing`, by its `modality` tag (or, untagged,
    the `untagged` kind); ValueError for a modality this code does not know."""
    if kinds is None:
        # The registry's modality objects import no torch; they import this module.
        from .modalities import MODALITIES

        kinds = [modality.exported for modality in MODALITIES]
    if "modality" not in stored:
        untagged = [kind for kind in kinds if kind.untagged]
        if not untagged:
            raise ValueError("preprocessing names no modality")
        return untagged[0]
    by_tag = {kind.modality: kind for kind in kinds}
    tag = stored["modality"]
    if tag not in by_tag:
        raise ValueError(f"unknown modality {tag!r}; known: {', '.join(by_tag)}")
    return by_tag[tag]


def read_model_config(
    model_dir: Path, *, kinds: Sequence[type[ExportedPreprocessing]] | None = None
) -> ModelConfig:
    """Read `model_dir/config.json` (`kinds` as `parse_model_config`); ModelConfigError names
    the file when it cannot."""
    path = model_dir / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ModelConfigError(f"cannot read an exported model's {path}: {error}") from None
    if not isinstance(data, dict):
        raise ModelConfigError(f"{path}: not a thaw model config")
    return parse_model_config(data, source=str(path), kinds=kinds)
