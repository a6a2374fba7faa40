"""Images to model input with numpy alone: what predict needs before any model runs.

Standard library, numpy and PIL only, so the API process prepares requests without importing
torch (a version served by ONNX Runtime never loads it).
"""

import numpy as np
from PIL import Image, ImageOps

from .artifacts import Preprocessing


def image_pixels(image: Image.Image, image_size: int) -> np.ndarray:
    """An image as the model's (image_size, image_size, 3) uint8 RGB input, before normalising.

    The same steps as training's `data.preprocess` (upright by EXIF, RGB, bilinear squash), split
    so that a batch is normalised in one operation (`normalise`) instead of image by image.
    """
    upright = ImageOps.exif_transpose(image)
    resized = upright.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


def normalise(pixels: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    """(N, H, W, 3) uint8 → (N, 3, H, W) float32, normalised as training's `preprocess` does:
    the same float32 operations in the same order, so the values are identical."""
    scaled = pixels.astype(np.float32) / np.float32(255)
    mean = np.asarray(preprocessing.mean, dtype=np.float32)
    std = np.asarray(preprocessing.std, dtype=np.float32)
    return np.ascontiguousarray(((scaled - mean) / std).transpose(0, 3, 1, 2))
