"""Serving an image model: a call's encoded images decoded and resized in the decode pool
(Pillow works outside the GIL) into uint8 pixels, a row per test-time view; the batcher
normalises a whole forward pass's pixels in one operation. Numpy and PIL only: the API's
inference path imports no torch."""

import base64
import binascii
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ...artifacts import ONNX_INPUT, ModelConfig
from ..base import (
    ItemReading,
    OipInput,
    PredictCaps,
    Prepared,
    RejectedItemError,
    bytes_tensor_elements,
)
from .exported import ExportedImagePreprocessing
from .pixels import CROP_ENLARGE, normalise, view_pixels

IMAGE_TENSOR = "images"
"""The Open Inference Protocol input of preprocessed pixels (FP32, NCHW)."""
IMAGE_BYTES = "image_bytes"
"""The Open Inference Protocol input of encoded images (BYTES), decoded as predict's are."""

PREPROCESSING = ExportedImagePreprocessing
"""Its models' kind of `config.json`'s `preprocessing` (an MLflow pyfunc reads it so)."""


def onnx_inputs(config: ModelConfig) -> list[tuple[str, str, list[int]]]:
    size = ExportedImagePreprocessing.of(config).image_size
    return [(ONNX_INPUT, "FP32", [3, size, size])]


def oip_inputs(config: ModelConfig) -> list[dict[str, Any]]:
    image = ExportedImagePreprocessing.of(config)
    size = image.image_size
    return [
        {
            "name": IMAGE_TENSOR,
            "datatype": "FP32",
            "shape": [-1, 3, size, size],
            "parameters": {
                "layout": "NCHW",
                "color": image.color,
                "resize": image.resize,
                "mean": list(image.mean),
                "std": list(image.std),
                "description": "RGB scaled to [0, 1], resized to the shape, minus `mean` "
                "over `std` per channel. Or send `image_bytes` instead.",
            },
        },
        {
            "name": IMAGE_BYTES,
            "datatype": "BYTES",
            "shape": [-1],
            "parameters": {"description": "Encoded images (base64 in JSON); thaw decodes them."},
        },
    ]


def served_inputs(config: ModelConfig, model_dir: Path) -> "ServedImages":
    return ServedImages(ExportedImagePreprocessing.of(config))


@dataclass(frozen=True)
class ServedImages:
    preprocessing: ExportedImagePreprocessing
    modality = "image"
    oip_input_names = (IMAGE_TENSOR, IMAGE_BYTES)

    @property
    def views(self) -> int:
        return len(self.preprocessing.tta)

    def warm_up_input(self) -> np.ndarray:
        size = self.preprocessing.image_size
        return np.zeros((1, 3, size, size), dtype=np.float32)

    def read(self, items: Sequence[Any]) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Images (PIL, or encoded bytes) as pixels, a row per test-time view (an image's
        views adjacent)."""
        size, views = self.preprocessing.image_size, self.preprocessing.tta
        pixels = []
        for item in items:
            image = Image.open(io.BytesIO(item)) if isinstance(item, bytes) else item
            if not isinstance(image, Image.Image):
                raise ValueError(
                    f"this image model takes images (PIL or bytes), not {type(item).__name__}"
                )
            pixels.append(view_pixels(image, size, views))
        return np.concatenate(pixels), [{} for _ in items]

    def prepare(self, items: Sequence[Any], reading: ItemReading) -> Prepared:
        """Per-image results, the indexes that decoded, and their pixels: a row per test-time
        view (`preprocessing.tta`), an image's views adjacent. A JPEG is decoded at a reduced
        scale when it is much larger than the model's input; `reading` caps the pixels
        decoded per image (`THAW_MAX_PREDICT_PIXELS`)."""
        results: list[dict[str, Any]] = [
            {"image": name, "top": None, "error": None} for name, _ in items
        ]
        good: list[int] = []
        pixels: list[np.ndarray] = []
        size, views = self.preprocessing.image_size, self.preprocessing.tta
        # The largest side a view is resized from (a crop view's enlarged image).
        draft_to = round(size * CROP_ENLARGE)
        for index, (_, data) in enumerate(items):
            if data is None:
                results[index]["error"] = {
                    "code": "invalid_base64",
                    "message": "`data` is not valid base64.",
                }
                continue
            try:
                with reading.open_image(data, draft_to=draft_to) as image:
                    pixels.append(view_pixels(image, size, views))
                good.append(index)
            except RejectedItemError as exc:
                results[index]["error"] = {"code": exc.code, "message": exc.message}
        return Prepared(results, good, np.concatenate(pixels) if pixels else None)

    def batch_input(self, blocks: list[np.ndarray]) -> np.ndarray:
        """Pixels normalised in one operation."""
        if all(block.dtype == np.uint8 for block in blocks):
            pixels = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
            return normalise(pixels, self.preprocessing)
        # A float32 block came preprocessed (the Open Inference Protocol's raw tensors): it
        # joins the pass as it is, beside the pixels normalised here.
        normalised = [
            block if block.dtype == np.float32 else normalise(block, self.preprocessing)
            for block in blocks
        ]
        return normalised[0] if len(normalised) == 1 else np.concatenate(normalised)

    def onnx_feed(self, batch: np.ndarray) -> dict[str, Any]:
        return {ONNX_INPUT: batch}

    def sample_item(self, sample: Any) -> tuple[str, bytes]:
        return str(sample.path), Path(sample.path).read_bytes()

    def kept_bytes(self, item: tuple[str, bytes | None]) -> bytes:
        return item[1] or b""

    def body_cap(self, caps: PredictCaps) -> int:
        floats = 3 * self.preprocessing.image_size**2
        per_image = max(caps.max_predict_bytes * 4 // 3 + 1024, floats * 16)
        return caps.max_predict_images * per_image + 65536

    def oip_input(self, tensor: Any, caps: PredictCaps) -> OipInput:
        if tensor.name == IMAGE_TENSOR:
            size = self.preprocessing.image_size
            if tensor.datatype != "FP32":
                raise ValueError(f"Input {IMAGE_TENSOR!r} is FP32; got {tensor.datatype}.")
            shape = tensor.shape
            if len(shape) != 4 or shape[1:] != (3, size, size) or not shape[0]:
                raise ValueError(
                    f"Input {IMAGE_TENSOR!r} has shape [-1, 3, {size}, {size}]; got {list(shape)}."
                )
            # A preprocessed tensor is one view, already made.
            return OipInput(
                tensor.data,
                preprocessed=True,
                views=1,
                limit=caps.max_predict_images,
                item="image",
            )
        elements = bytes_tensor_elements(tensor)
        encoded = elements if tensor.binary else [_base64(element) for element in elements]
        named = [(f"{IMAGE_BYTES}[{index}]", image) for index, image in enumerate(encoded)]
        return OipInput(
            named,
            preprocessed=False,
            views=self.views,
            limit=caps.max_predict_images,
            item="image",
        )


def _base64(element: bytes) -> bytes | None:
    """An encoded image sent in JSON, base64-decoded (None where it is not base64)."""
    try:
        return base64.b64decode(element, validate=True)
    except (binascii.Error, ValueError):
        return None
