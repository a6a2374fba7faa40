"""Does transfer actually help? Pretrained efficientnet_lite0 features on sklearn's digits."""

import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from worker.engine import Sample, TransferConfig, compile_plan, run


def _write_digits(folder: Path) -> list[Sample]:
    """The 8x8 digit scans as PNGs; preprocessing upsamples them like any small upload."""
    digits = load_digits()
    samples = []
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        path = folder / f"{index:04d}.png"
        Image.fromarray((pixels * 255 / 16).astype(np.uint8)).save(path)
        samples.append(Sample(path, int(label)))
    return samples


def test_feature_extraction_learns_digits(tmp_path: Path) -> None:
    samples = _write_digits(tmp_path)
    order = np.random.default_rng(0).permutation(len(samples))
    train = [samples[i] for i in order[:1200]]
    val = [samples[i] for i in order[1200:]]
    plan = compile_plan(
        TransferConfig(
            base_model="efficientnet_lite0",
            strategy="feature_extraction",
            num_classes=10,
            image_size=64,
            epochs=10,
            lr=3e-3,
        )
    )

    started = time.perf_counter()
    result = run(plan, train=train, val=val, classes=[str(d) for d in range(10)])
    seconds = time.perf_counter() - started

    accuracy = result.metrics["val_accuracy"]
    print(f"digits feature_extraction@64px: val accuracy {accuracy:.4f} in {seconds:.1f}s")
    assert accuracy >= 0.85
