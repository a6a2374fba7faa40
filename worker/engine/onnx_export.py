"""Export a trained model to ONNX and check that ONNX Runtime computes what PyTorch computes."""

import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .artifacts import ONNX_INPUT, ONNX_OUTPUT

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
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    samples = [
        torch.randn(n, 3, image_size, image_size, generator=generator) for n in PARITY_BATCHES
    ]
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of the dynamo one, which needs
            # onnxscript; it still exports these convolutional models exactly.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (samples[0].to(device),),
                str(out_path),
                input_names=[ONNX_INPUT],
                output_names=[ONNX_OUTPUT],
                dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
        max_diff = 0.0
        for batch in samples:
            with torch.no_grad():
                expected = model(batch.to(device)).cpu().numpy()
            (actual,) = session.run([ONNX_OUTPUT], {ONNX_INPUT: batch.numpy()})
            max_diff = max(max_diff, float(np.abs(np.asarray(actual) - expected).max()))
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
