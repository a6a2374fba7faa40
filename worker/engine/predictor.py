"""Inference on an exported model folder, in PyTorch, for any modality: the model's
`ServedInputs` read the items (as the API's predict reads them) and its modality's
`torch_forward` runs them."""

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

import torch
from torch import Tensor

from .artifacts import CONFIG_FILE, ModelConfig, parse_model_config
from .modalities import modality_for
from .modalities.base import ServedInputs
from .model import TransferModel, load_exported

Top = list[tuple[str, float]]

ITEMS_PER_PASS = 16
"""Items read and run per forward pass (an image's test-time views are rows of its pass)."""

Forward = Callable[[Any], tuple[Tensor, list[Tensor]]]
"""A forward-pass input, as `ServedInputs.batch_input` makes it → (features, per-task logits)."""


def read_probabilities(
    forward: Forward,
    served: ServedInputs,
    items: Sequence[Any],
    *,
    task: int = -1,
    temperature: float = 1.0,
) -> Tensor:
    """(N, classes) on the CPU: per item, the mean over its test-time views of
    softmax(logits / temperature) of task `task` (the newest by default)."""
    chunks = []
    for start in range(0, len(items), ITEMS_PER_PASS):
        chunk = items[start : start + ITEMS_PER_PASS]
        block, _notes = served.read(chunk)
        _features, logits = forward(served.batch_input([block]))
        probabilities = (logits[task].float() / temperature).softmax(dim=1)
        chunks.append(probabilities.reshape(len(chunk), served.views, -1).mean(dim=1).cpu())
    return torch.cat(chunks)


class Predictor:
    def __init__(
        self, model: TransferModel, config: dict[str, Any], device: torch.device, model_dir: Path
    ) -> None:
        self.config = config
        """`config.json` as written; `exported` is the same, read."""
        self.device = device
        self.exported: ModelConfig = parse_model_config(config)
        self.labels: list[str] = list(self.exported.labels)
        """The default (newest) task's labels."""
        self.tasks: dict[str, list[str]] = self.exported.task_labels()
        """Labels per task name, oldest first; a single-task model has just its own."""
        modality = modality_for(self.exported.modality)
        self.served: ServedInputs = modality.served_inputs(self.exported, model_dir)
        """How the model reads its items (`read`): a text model's tokenizer, an image model's
        pixels and test-time views."""
        self.forward, self.model = modality.torch_forward(model.to(device).eval(), device)

    @classmethod
    def load(
        cls,
        model_dir: Path,
        device: str = "cpu",
        *,
        model: TransferModel | None = None,
        weights_dir: Path | None = None,
    ) -> Self:
        """The exported model in `model_dir`. `model`: the model whose weights `model_dir`
        holds, still in memory (a job scoring what it has just exported), used as it is
        instead of being built and loaded again. `weights_dir`: where the base model's
        weights are, for a version that stores only its adapters (`load_exported`)."""
        config = json.loads((model_dir / CONFIG_FILE).read_text())
        parse_model_config(config, source=str(model_dir))
        if model is None:
            model = load_exported(model_dir, weights_dir=weights_dir)
        return cls(model, config, torch.device(device), model_dir)

    def _task(self, task: str | None) -> tuple[int, list[str]]:
        names = list(self.tasks)
        if task is not None and task not in names:
            raise ValueError(f"unknown task {task!r}; this model answers {names}")
        index = len(names) - 1 if task is None else names.index(task)
        return index, self.tasks[names[index]]

    def predict(
        self,
        items: Sequence[Any],
        top_k: int = 5,
        task: str | None = None,
        *,
        calibrated: bool = True,
    ) -> list[Top]:
        """Top-k (label, probability) per item (a PIL image; a text), most probable first.

        `task` picks one of a multi-task (LwF) model's tasks by name; None is the newest.
        Probabilities are temperature-scaled as fitted at publish (`calibration.py`) unless
        `calibrated` is False, and averaged over the test-time views the model was validated
        with (`config.json`'s `preprocessing.tta`; the image alone by default). Items of
        another modality's kind are a ValueError.
        """
        index, labels = self._task(task)
        if not items:
            return []
        temperature = self.exported.temperatures()[index] if calibrated else 1.0
        probabilities = read_probabilities(
            self.forward, self.served, items, task=index, temperature=temperature
        )
        k = max(1, min(top_k, len(labels)))
        values, indices = probabilities.topk(k, dim=1)
        return [
            [(labels[i], value) for i, value in zip(row_indices, row_values, strict=True)]
            for row_indices, row_values in zip(indices.tolist(), values.tolist(), strict=True)
        ]
