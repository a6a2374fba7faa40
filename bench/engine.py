"""Engine overhead, measured against hand-written PyTorch on the same machine in one run.

(a) thaw's fine-tuning throughput through `run` divided by a minimal loop's on the same
    model, images, batch size and threads (target >= 0.95);
(b) a 10-epoch feature_extraction job's wall time against a loop that runs the frozen
    backbone every epoch (target >= 6x faster).

Run as `.venv/bin/python bench/engine.py`. Each side runs `--repeats` times, alternating,
and the fastest of each counts, so other load on the machine penalises both alike.
"""

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from worker.engine import (
    ImageDataset,
    Plan,
    Sample,
    TransferConfig,
    build_model,
    compile_plan,
    run,
)
from worker.engine.modalities.image.preprocessing import ImagePreprocessing, final_image_size

CLASSES = 4


def write_images(folder: Path, count: int, seed: int) -> list[Sample]:
    """Noisy images with a class-dependent tint, as PNG files like an uploaded dataset."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for index in range(count):
        label = index % CLASSES
        pixels = rng.integers(0, 200, size=(96, 96, 3)) + 50 * (np.arange(3) == label % 3)
        path = folder / f"{index:05d}.png"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)
        samples.append(Sample(path, label))
    return samples


def loader(
    plan: Plan, samples: list[Sample], *, shuffle: bool
) -> DataLoader[tuple[torch.Tensor, int]]:
    pixels = ImagePreprocessing.of(plan)
    dataset = ImageDataset(
        samples, image_size=final_image_size(plan), mean=pixels.mean, std=pixels.std
    )
    return DataLoader(dataset, batch_size=plan.batch_size, shuffle=shuffle)


def hand_fine_tune(plan: Plan, train: list[Sample], val: list[Sample]) -> None:
    """What a user would write: AdamW over every parameter, a val pass per epoch."""
    torch.manual_seed(plan.seed)
    model = build_model(plan, weights_dir=None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=plan.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(plan.stages[0].epochs):
        model.train()
        for inputs, targets in loader(plan, train, shuffle=True):
            loss = loss_fn(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            for inputs, _ in loader(plan, val, shuffle=False):
                model(inputs)


def hand_feature_extraction(plan: Plan, train: list[Sample], val: list[Sample]) -> None:
    """The naive frozen-backbone loop: the backbone runs on every image every epoch."""
    torch.manual_seed(plan.seed)
    model = build_model(plan, weights_dir=None)
    model.backbone.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=plan.stages[0].group_lrs["head"])
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(plan.stages[0].epochs):
        model.eval()
        model.head.train()
        for inputs, targets in loader(plan, train, shuffle=True):
            with torch.no_grad():
                features = model.backbone(inputs)
            loss = loss_fn(model.head(features), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            for inputs, _ in loader(plan, val, shuffle=False):
                model(inputs)


def fastest(repeats: int, jobs: dict[str, Callable[[], object]]) -> dict[str, float]:
    best = dict.fromkeys(jobs, float("inf"))
    for _ in range(repeats):
        for name, job in jobs.items():
            started = time.perf_counter()
            job()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--train", type=int, default=256)
    parser.add_argument("--val", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as folder:
        train = write_images(Path(folder) / "train", args.train, seed=1)
        val = write_images(Path(folder) / "val", args.val, seed=2)
        common = {
            "base_model": args.base_model,
            "num_classes": CLASSES,
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "pretrained": False,
            "schedule": "constant",
        }
        classes = [str(c) for c in range(CLASSES)]

        # BatchNorm in train mode on both sides, so both loops do the same arithmetic.
        tune = compile_plan(
            TransferConfig(strategy="fine_tune", epochs=2, bn_mode="train", **common)
        )
        times = fastest(
            args.repeats,
            {
                "thaw": lambda: run(tune, train=train, val=val, classes=classes),
                "hand": lambda: hand_fine_tune(tune, train, val),
            },
        )
        images = tune.stages[0].epochs * len(train)
        print(
            f"(a) fine_tune {args.base_model}@{args.image_size}px, {len(train)} train / "
            f"{len(val)} val images, batch {args.batch_size}, {args.threads} threads, 2 epochs"
        )
        print(f"    thaw run:  {images / times['thaw']:7.1f} train images/s ({times['thaw']:.2f}s)")
        print(f"    hand loop: {images / times['hand']:7.1f} train images/s ({times['hand']:.2f}s)")
        print(
            f"    ratio thaw/hand throughput: {times['hand'] / times['thaw']:.3f} (target >= 0.95)"
        )

        extract = compile_plan(
            TransferConfig(strategy="feature_extraction", epochs=10, lr=3e-3, **common)
        )
        times = fastest(
            max(1, args.repeats - 1),
            {
                "thaw": lambda: run(extract, train=train, val=val, classes=classes),
                "hand": lambda: hand_feature_extraction(extract, train, val),
            },
        )
        print("(b) feature_extraction, 10 epochs, same data and model")
        print(f"    thaw run (cached features): {times['thaw']:.2f}s")
        print(f"    naive loop (backbone every epoch): {times['hand']:.2f}s")
        print(f"    speed-up: {times['hand'] / times['thaw']:.1f}x (target >= 6x)")


if __name__ == "__main__":
    main()
