"""Inference on an exported model folder."""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import torch
from PIL import Image

from .artifacts import CONFIG_FILE, ModelConfig, parse_model_config
from .modalities.image.exported import ExportedImagePreprocessing
from .modalities.image.tta import view_probabilities
from .modalities.text.exported import ExportedTextPreprocessing
from .modalities.text.tokens import Encoded, SpecialTokens, encode, load_backend, pad
from .model import TransferModel, load_exported

Top = list[tuple[str, float]]


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
        self.tokenizer: Any = None
        """A text model's `tokenizers.Tokenizer` (set by `load`)."""

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
        exported = parse_model_config(config, source=str(model_dir))
        if model is None:
            model = load_exported(model_dir, weights_dir=weights_dir)
        torch_device = torch.device(device)
        # A model given from training may be channels-last (amp on CUDA): served as loaded.
        model.to(torch_device).to(memory_format=torch.contiguous_format).eval()
        predictor = cls(model, config, torch_device)
        if isinstance(exported.preprocessing, ExportedTextPreprocessing):
            predictor.tokenizer = load_backend(model_dir)
        return predictor

    def _task(self, task: str | None) -> tuple[int, list[str]]:
        names = list(self.tasks)
        if task is not None and task not in names:
            raise ValueError(f"unknown task {task!r}; this model answers {names}")
        index = len(names) - 1 if task is None else names.index(task)
        return index, self.tasks[names[index]]

    def predict(
        self,
        images: Sequence[Image.Image],
        top_k: int = 5,
        task: str | None = None,
        *,
        calibrated: bool = True,
    ) -> list[Top]:
        """Top-k (label, probability) per image, most probable first.

        `task` picks one of a multi-task (LwF) model's tasks by name; None is the newest.
        Probabilities are temperature-scaled as fitted at publish (`calibration.py`) unless
        `calibrated` is False, and averaged over the test-time views the model was validated
        with (`config.json`'s `preprocessing.tta`; the image alone by default).
        """
        index, labels = self._task(task)
        if not images:
            return []
        temperature = self.exported.temperatures()[index] if calibrated else 1.0
        probabilities = view_probabilities(
            self.model,
            images,
            ExportedImagePreprocessing.of(self.exported),
            self.device,
            task=index,
            temperature=temperature,
        )
        return self._top(probabilities, labels, top_k)

    def encode_texts(self, texts: Sequence[str]) -> Encoded:
        """Texts tokenized and truncated exactly as in training."""
        text = ExportedTextPreprocessing.of(self.exported)
        return encode(
            self.tokenizer,
            texts,
            SpecialTokens.from_dict(text.special_tokens),
            max_length=text.max_length,
            truncation=text.truncation,
        )

    def predict_texts(
        self,
        texts: Sequence[str],
        top_k: int = 5,
        task: str | None = None,
        *,
        calibrated: bool = True,
    ) -> list[tuple[Top, bool]]:
        """Top-k (label, probability) per text, most probable first, and whether the text was
        truncated to the model's length; calibrated as `predict`."""
        index, labels = self._task(task)
        if not texts:
            return []
        encoded = self.encode_texts(texts)
        pad_id = ExportedTextPreprocessing.of(self.exported).special_tokens["pad_id"]
        ids, mask = pad(encoded.ids, pad_id)
        batch = torch.stack([torch.from_numpy(ids), torch.from_numpy(mask)], dim=1)
        with torch.inference_mode():
            logits = self.model.forward_tasks(batch.to(self.device))[index]
        temperature = self.exported.temperatures()[index] if calibrated else 1.0
        tops = self._top((logits / temperature).softmax(dim=1), labels, top_k)
        return list(zip(tops, encoded.truncated, strict=True))

    def _top(self, probabilities: torch.Tensor, labels: list[str], top_k: int) -> list[Top]:
        k = max(1, min(top_k, len(labels)))
        values, indices = probabilities.topk(k, dim=1)
        return [
            [(labels[i], value) for i, value in zip(row_indices, row_values, strict=True)]
            for row_indices, row_values in zip(indices.tolist(), values.tolist(), strict=True)
        ]
