"""One job on two processes (`gpus: 2`, gloo on the CPU) against the same job on one process.

Same plan but for `gpus`, same digits, one run: prints the largest difference between the two
runs' final weights, both validation accuracies, and the wall time of the two-process run
divided by the one-process run's (process start-up, the duplicated data loading, feature cache
and evaluation of every rank, and the gradient all-reduce included). Each process gets
`--threads` threads, so the two-process run uses twice the cores; on the CPU this shows the
overhead of the process group more than any speed-up, which is for GPUs (nccl; unrun here).

Run as `.venv/bin/python bench/ddp.py [--train N] [--threads T]`.
"""

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits

from worker.engine import Sample, StageSpec, TrainingResult, TransferConfig, compile_plan, run

CONFIG = TransferConfig(
    base_model="efficientnet_lite0",
    strategy="freeze_unfreeze",
    num_classes=10,
    image_size=64,
    batch_size=32,
    seed=0,
    stages=(
        StageSpec(groups=("head",), epochs=2, lr=0.003),
        StageSpec(groups=("all",), epochs=1, lr=0.0005),
    ),
)


def digits(folder: Path, count: int) -> list[Sample]:
    """The first `count` 8x8 digit scans (shuffled) as PNG files."""
    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.images))[:count]
    samples = []
    for index in order:
        path = folder / f"{index:04d}.png"
        Image.fromarray((data.images[index] * 255 / 16).astype(np.uint8)).save(path)
        samples.append(Sample(path, int(data.target[index])))
    return samples


def timed(gpus: int, train: list[Sample], val: list[Sample]) -> tuple[TrainingResult, float]:
    started = time.perf_counter()
    result = run(
        compile_plan(replace(CONFIG, gpus=gpus)),
        train=train,
        val=val,
        classes=[str(digit) for digit in range(10)],
    )
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", type=int, default=480)
    parser.add_argument("--val", type=int, default=240)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    report(train_count=args.train, val_count=args.val, threads=args.threads)


def report(*, train_count: int, val_count: int, threads: int) -> None:
    """Run the job on one process and on two, and print how they compare (also called by
    bench/storage.py, which reports the fleet's figures together)."""
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as folder:
        samples = digits(Path(folder), train_count + val_count)
        train, val = samples[:train_count], samples[train_count:]
        one, one_seconds = timed(1, train, val)
        two, two_seconds = timed(2, train, val)
    expected = one.model.state_dict()
    worst, name = max(
        (float((tensor.float() - expected[name].float()).abs().max()), name)
        for name, tensor in two.model.state_dict().items()
    )
    relative = max(
        float((tensor.float() - expected[name].float()).abs().max())
        / max(float(expected[name].float().abs().max()), 1e-12)
        for name, tensor in two.model.state_dict().items()
    )
    print(
        f"digits: {train_count} train, {val_count} val; {CONFIG.base_model} "
        f"{CONFIG.image_size}px, batch {CONFIG.batch_size}, {threads} thread(s) per process; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"weights: largest |2 processes - 1 process| = {worst:.3g} (in {name}, whose largest "
        f"|value| is {float(expected[name].float().abs().max()):.3g}); largest difference "
        f"relative to its tensor's largest |value|: {relative:.3g}"
    )
    print(
        f"val accuracy: 1 process {one.metrics['val_accuracy']:.4f}, "
        f"2 processes {two.metrics['val_accuracy']:.4f}"
    )
    print(
        f"wall time: 1 process {one_seconds:.1f}s, 2 processes {two_seconds:.1f}s, "
        f"ratio (2 / 1) {two_seconds / one_seconds:.2f}"
    )


if __name__ == "__main__":
    main()
