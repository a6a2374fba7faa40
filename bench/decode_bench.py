"""How long predict's decoding takes for 16 large images: as it was (the upload pixel cap,
40 MP, every pixel decoded) against now (THAW_MAX_PREDICT_PIXELS, 4 MP by default, and JPEGs
decoded at a reduced scale).

    python bench/decode_bench.py
"""

import dataclasses
import io
import time

import numpy as np
from PIL import Image

from service.datasets.ingest import ImageRejectedError, open_image
from service.datasets.ingest.results import IngestLimits
from service.inference.service import ItemReader
from worker.engine.modalities.image.exported import ExportedImagePreprocessing
from worker.engine.modalities.image.pixels import view_pixels
from worker.engine.modalities.image.serving import ServedImages

PREPROCESSING = ExportedImagePreprocessing(
    image_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
)
UPLOAD_LIMITS = IngestLimits()
PREDICT_LIMITS = dataclasses.replace(UPLOAD_LIMITS, max_image_pixels=4_000_000)


def encoded(side: int, fmt: str) -> bytes:
    # A gradient under a tiled pattern of noise: compresses like a photo, not a flat fill.
    ramp = np.linspace(0, 200, side, dtype=np.uint8)
    tile = np.random.default_rng(0).integers(0, 40, (500, 500, 3), dtype=np.uint8)
    noise = np.tile(tile, (side // 500 + 1, side // 500 + 1, 1))[:side, :side]
    pixels = noise + ramp[None, :, None]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def as_before(images: list[tuple[str, bytes | None]]) -> tuple[float, int]:
    """Predict's decoding before: the upload's pixel cap, every pixel decoded."""
    started, good = time.perf_counter(), 0
    for _, data in images:
        assert data is not None
        try:
            with open_image(io.BytesIO(data), UPLOAD_LIMITS) as image:
                view_pixels(image, PREPROCESSING.image_size, PREPROCESSING.tta)
            good += 1
        except ImageRejectedError:
            pass
    return time.perf_counter() - started, good


def as_now(images: list[tuple[str, bytes | None]]) -> tuple[float, int]:
    started = time.perf_counter()
    reading = ItemReader(PREDICT_LIMITS, max_text_chars=0)
    _, good, _ = ServedImages(PREPROCESSING).prepare(images, reading)
    return time.perf_counter() - started, len(good)


def main() -> None:
    print("| 16 images of | KB each | before (40 MP cap, full decode) | now |")
    print("|---|---|---|---|")
    for side, fmt in ((6000, "PNG"), (6000, "JPEG"), (4000, "JPEG"), (2000, "PNG")):
        data = encoded(side, fmt)
        images: list[tuple[str, bytes | None]] = [(f"{i}.{fmt}", data) for i in range(16)]
        before, decoded_before = as_before(images)
        after, decoded_after = as_now(images)
        print(
            f"| {side}x{side} {fmt} | {len(data) // 1024} | {before:.2f} s ({decoded_before} "
            f"decoded) | {after:.2f} s ({decoded_after} decoded) |"
        )


if __name__ == "__main__":
    main()
