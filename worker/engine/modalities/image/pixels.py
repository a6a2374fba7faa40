"""Images to model input with numpy alone: what predict needs before any model runs.

Standard library, numpy and PIL only, so the API process prepares requests without importing
torch (a version served by ONNX Runtime never loads it).

Test-time augmentation is also here, the one home of its views: an image is shown to the
model as several views at the trained size (`view_pixels`), and the model's answer is the
mean of its per-view probabilities (`modalities.base.average_views`). Evaluation at the end
of training and both predict backends build the views with these functions, so predict does
what evaluation measured.
"""

from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ...recipe import CROP_VIEWS, FLIP_VIEW, ORIGINAL_VIEW
from .exported import ExportedImagePreprocessing

CROP_ENLARGE = 8 / 7
"""Crops are taken at the trained size from the image squashed this much larger (the usual
0.875 centre-crop ratio), so each sees most of the image, slightly enlarged."""


def read_image(path: Path) -> Image.Image:
    """An image file, decoded in full and closed."""
    with Image.open(path) as image:
        image.load()
        return image


def image_pixels(image: Image.Image, image_size: int) -> np.ndarray:
    """An image as the model's (image_size, image_size, 3) uint8 RGB input, before normalising.

    The same steps as training's `data.preprocess` (upright by EXIF, RGB, bilinear squash), split
    so that a batch is normalised in one operation (`normalise`) instead of image by image.
    """
    return view_pixels(image, image_size, (ORIGINAL_VIEW,))[0]


def normalise(pixels: np.ndarray, preprocessing: ExportedImagePreprocessing) -> np.ndarray:
    """(N, H, W, 3) uint8 → (N, 3, H, W) float32, normalised as training's `preprocess` does.

    A uint8 channel has 256 values, so each is normalised once (`_channel_tables`, with the
    same float32 operations in the same order as training, so the values are identical) and
    the batch is a table lookup: 5x less CPU than computing every pixel (bench/inference.py's
    profile), and it runs in the batcher's one thread, ahead of every forward pass."""
    # Tuples whatever the caller built: the tables are cached by value.
    tables = _channel_tables(tuple(preprocessing.mean), tuple(preprocessing.std))
    planar = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))
    normalised = np.empty(planar.shape, dtype=np.float32)
    for channel, table in enumerate(tables):
        np.take(table, planar[:, channel], out=normalised[:, channel], mode="clip")
    return normalised


@cache
def _channel_tables(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3, 256) float32: every uint8 value of each channel, scaled to [0, 1] and normalised."""
    scaled = np.arange(256, dtype=np.uint8)[:, None].astype(np.float32) / np.float32(255)
    mean_array = np.asarray(mean, dtype=np.float32)
    std_array = np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(((scaled - mean_array) / std_array).T)


def view_pixels(image: Image.Image, image_size: int, views: tuple[str, ...]) -> np.ndarray:
    """(len(views), image_size, image_size, 3) uint8: the image as each named view.

    `original` is exactly `image_pixels`; `flip` mirrors it; `crop_<where>` is a trained-size
    crop of the image squashed `CROP_ENLARGE` times larger; `flip_crop_<where>` mirrors that.
    """
    upright = ImageOps.exif_transpose(image).convert("RGB")
    squashed = np.asarray(
        upright.resize((image_size, image_size), Image.Resampling.BILINEAR), dtype=np.uint8
    )
    enlarged: np.ndarray | None = None
    made = []
    for view in views:
        unmirrored = view.removeprefix(f"{FLIP_VIEW}_") if view != FLIP_VIEW else ORIGINAL_VIEW
        if unmirrored == ORIGINAL_VIEW:
            pixels = squashed
        elif unmirrored in CROP_VIEWS:
            if enlarged is None:
                large = round(image_size * CROP_ENLARGE)
                enlarged = np.asarray(
                    upright.resize((large, large), Image.Resampling.BILINEAR), dtype=np.uint8
                )
            pixels = _crop(enlarged, unmirrored, image_size)
        else:
            raise ValueError(f"unknown test-time view {view!r}")
        made.append(pixels[:, ::-1] if view.startswith(FLIP_VIEW) else pixels)
    return np.stack(made)


def _crop(pixels: np.ndarray, where: str, size: int) -> np.ndarray:
    spare = pixels.shape[0] - size
    top = {"center": spare // 2, "top": 0, "bottom": spare}
    left = {"center": spare // 2, "left": 0, "right": spare}
    parts = where.removeprefix("crop_").split("_")
    row, column = (parts[0], parts[0]) if len(parts) == 1 else parts
    y, x = top[row], left[column]
    return pixels[y : y + size, x : x + size]
