"""Export a trained model to ONNX and check that ONNX Runtime computes what PyTorch computes."""

import logging
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .artifacts import ONNX_FEATURES, ONNX_INPUT, ONNX_OUTPUT, ONNX_TEXT_INPUTS

logger = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4
# Batch sizes the parity check runs: 1 and more than 1, so the dynamic batch axis is exercised.
PARITY_BATCHES = (1, 4)


@dataclass(frozen=True)
class OnnxExport:
    exported: bool
    max_abs_diff: float | None
    """Largest |ONNX Runtime logit - PyTorch logit| over the sample inputs."""
    reason: str | None = None
    """Why there is no `model.onnx`, when `exported` is false."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _WithFeatures(nn.Module):
    """The new task's logits and, as a second output, the pooled backbone features the logits
    are computed from: predict gets monitoring's features from the same pass, for free."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, logits = self.model.forward_with_features(inputs)  # type: ignore[operator]
        return logits[-1], features


class _TextInputs(_WithFeatures):
    """A text model with ONNX's two inputs, packed into the one tensor the model takes."""

    def forward(  # type: ignore[override]
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(torch.stack([input_ids, attention_mask], dim=1))


def export_onnx(
    model: nn.Module,
    *,
    image_size: int,
    out_path: Path,
    tolerance: float = PARITY_TOLERANCE,
    seed: int = 0,
) -> OnnxExport:
    """Write `out_path` (dynamic batch axis) if ONNX Runtime agrees with PyTorch within
    `tolerance` on seeded sample inputs; otherwise leave no file and say why.

    Never raises for an export problem: a model without ONNX is still a usable model.
    """
    generator = torch.Generator().manual_seed(seed)
    samples = [
        (torch.randn(n, 3, image_size, image_size, generator=generator),) for n in PARITY_BATCHES
    ]
    return _export_checked(
        _WithFeatures(model),
        samples,
        (ONNX_INPUT,),
        {ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}, ONNX_FEATURES: {0: "batch"}},
        out_path,
        tolerance,
    )


def export_text_onnx(
    model: nn.Module,
    *,
    vocab_size: int,
    max_length: int,
    out_path: Path,
    tolerance: float = PARITY_TOLERANCE,
    seed: int = 0,
) -> OnnxExport:
    """`export_onnx` for a text model: inputs `input_ids` and `attention_mask` (int64, batch
    and length dynamic), checked on seeded token ids of several lengths with padding."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for batch, length in zip(PARITY_BATCHES, (max_length, max(2, max_length // 3)), strict=True):
        ids = torch.randint(vocab_size, (batch, length), generator=generator)
        lengths = torch.randint(1, length + 1, (batch,), generator=generator)
        lengths[0] = length
        mask = (torch.arange(length) < lengths.unsqueeze(1)).long()
        samples.append((ids * mask, mask))
    names = ONNX_TEXT_INPUTS
    axes = {name: {0: "batch", 1: "length"} for name in names}
    return _export_checked(
        _TextInputs(model),
        samples,
        names,
        {**axes, ONNX_OUTPUT: {0: "batch"}, ONNX_FEATURES: {0: "batch"}},
        out_path,
        tolerance,
    )


def _export_checked(
    model: nn.Module,
    samples: Sequence[tuple[torch.Tensor, ...]],
    input_names: tuple[str, ...],
    dynamic_axes: dict[str, dict[int, str]],
    out_path: Path,
    tolerance: float,
) -> OnnxExport:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of the dynamo one, which needs
            # onnxscript; it still exports these models exactly.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                tuple(tensor.to(device) for tensor in samples[0]),
                str(out_path),
                input_names=list(input_names),
                output_names=[ONNX_OUTPUT, ONNX_FEATURES],
                dynamic_axes=dynamic_axes,
                opset_version=17,
                dynamo=False,
            )
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
        max_diff = 0.0
        for inputs in samples:
            with torch.no_grad():
                expected = model(*(tensor.to(device) for tensor in inputs))
            feed = {name: tensor.numpy() for name, tensor in zip(input_names, inputs, strict=True)}
            actual = session.run([ONNX_OUTPUT, ONNX_FEATURES], feed)
            for ours, theirs in zip(actual, expected, strict=True):
                difference = np.abs(np.asarray(ours) - theirs.cpu().numpy()).max()
                max_diff = max(max_diff, float(difference))
    except Exception as exc:
        logger.warning("ONNX export failed: %s: %s", type(exc).__name__, exc)
        out_path.unlink(missing_ok=True)
        return OnnxExport(False, None, f"export failed: {type(exc).__name__}: {exc}")
    finally:
        model.train(was_training)
    if not max_diff < tolerance:
        out_path.unlink(missing_ok=True)
        return OnnxExport(
            False,
            max_diff,
            f"ONNX Runtime differs from PyTorch by {max_diff:.3g} (tolerance {tolerance:g})",
        )
    return OnnxExport(True, max_diff)
