"""Inference on an exported model folder."""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from .artifacts import CONFIG_FILE, WEIGHTS_FILE, ModelConfig, parse_model_config
from .model import TransferModel, build_model
from .pixels import image_pixels, normalise
from .plan import Plan


class Predictor:
    def __init__(self, model: TransferModel, config: dict[str, Any], device: torch.device) -> None:
        self.model = model
        self.config = config
        """`config.json` as written; `exported` is the same, read."""
        self.device = device
        self.exported: ModelConfig = parse_model_config(config)
        self.labels: list[str] = list(self.exported.labels)
        """The default (newest) task's labels."""
        self.tasks: dict[str, list[str]] = self.exported.task_labels()
        """Labels per task name, oldest first; a single-task model has just its own."""

    @classmethod
    def load(cls, model_dir: Path, device: str = "cpu") -> Self:
        config = json.loads((model_dir / CONFIG_FILE).read_text())
        plan = Plan.from_dict(parse_model_config(config, source=str(model_dir)).plan)
        # The exported weights replace everything, so no ImageNet weights are needed here.
        model = build_model(plan, weights_dir=None, pretrained=False)
        model.load_state_dict(load_file(model_dir / WEIGHTS_FILE), strict=True)
        torch_device = torch.device(device)
        model.to(torch_device).eval()
        return cls(model, config, torch_device)

    def predict(
        self,
        images: Sequence[Image.Image],
        top_k: int = 5,
        task: str | None = None,
        *,
        calibrated: bool = True,
    ) -> list[list[tuple[str, float]]]:
        """Top-k (label, probability) per image, most probable first.

        `task` picks one of a multi-task (LwF) model's tasks by name; None is the newest.
        Probabilities are temperature-scaled as fitted at publish (`calibration.py`) unless
        `calibrated` is False.
        """
        names = list(self.tasks)
        if task is not None and task not in names:
            raise ValueError(f"unknown task {task!r}; this model answers {names}")
        index = len(names) - 1 if task is None else names.index(task)
        labels = self.tasks[names[index]]
        if not images:
            return []
        preprocessing = self.exported.preprocessing
        pixels = np.stack([image_pixels(image, preprocessing.image_size) for image in images])
        batch = torch.from_numpy(normalise(pixels, preprocessing)).to(self.device)
        with torch.inference_mode():
            logits = self.model.forward_tasks(batch)[index]
        temperature = self.exported.temperatures()[index] if calibrated else 1.0
        probabilities = (logits / temperature).softmax(dim=1)
        k = max(1, min(top_k, len(labels)))
        values, indices = probabilities.topk(k, dim=1)
        return [
            [(labels[i], value) for i, value in zip(row_indices, row_values, strict=True)]
            for row_indices, row_values in zip(indices.tolist(), values.tolist(), strict=True)
        ]
