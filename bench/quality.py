"""Few-shot accuracy of thaw's defaults against a careful hand-written recipe, on real images.

Datasets, built at run time (nothing large is committed):
- `digits`: sklearn's 8x8 digit scans (10 classes), as PNGs;
- `icons`: the installed Adwaita icon theme's 48px icons (Debian package `adwaita-icon-theme`),
  labelled by their context folder (actions, devices, mimetypes, places, status), flattened on
  white. A different need from digits: line drawings whose class is what they show, where
  mirroring changes nothing.
Each dataset is split few-shot: `--shots` training images per class, up to `--val` per class
for validation, per seed a different draw.

Rows, per dataset (mean validation accuracy over seeds):
- `thaw defaults`: a spec with only the base model (`TransferConfig` defaults otherwise);
- `augment=<level>`: the defaults with that augmentation level;
- `hand recipe`: plain PyTorch on the same backbone and weights: random resized crop and
  flip, label smoothing 0.1, one epoch of head warm-up then the whole network at
  discriminative rates (÷2.6 per group), AdamW and cosine decay, flip test-time augmentation.
Test-time augmentation for thaw: the `thaw defaults + tta` row adds `tta: flip` (the hand
recipe's flip TTA) and reads the accuracy of the averaged views.

Run as `.venv/bin/python bench/quality.py [--seeds 2] [--shots 5]`. Target: thaw's defaults
>= the hand recipe on both datasets.
"""

import argparse
import math
import tempfile
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from worker.engine import Sample, TransferConfig, build_backbone, compile_plan, run
from worker.engine.spec import AugmentLevel, TransferSettings
from worker.engine.zoo import get_base_model_info

BASE_MODEL = "efficientnet_lite0"
ICON_ROOT = Path("/usr/share/icons/Adwaita/48x48")
ICON_CONTEXTS = ("actions", "devices", "mimetypes", "places", "status")
LEVELS: tuple[str, ...] = get_args(AugmentLevel)


def digits_dataset(folder: Path) -> tuple[list[Sample], list[str]]:
    from sklearn.datasets import load_digits

    data = load_digits()
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for index, (pixels, label) in enumerate(zip(data.images, data.target, strict=True)):
        path = folder / f"{index:04d}.png"
        Image.fromarray((pixels * 255 / 16).astype(np.uint8)).save(path)
        samples.append(Sample(path, int(label)))
    return samples, [str(digit) for digit in range(10)]


def icons_dataset(folder: Path) -> tuple[list[Sample], list[str]]:
    if not ICON_ROOT.is_dir():
        raise SystemExit(f"no icons at {ICON_ROOT}: apt-get install adwaita-icon-theme")
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for label, context in enumerate(ICON_CONTEXTS):
        for source in sorted((ICON_ROOT / context).glob("*.png")):
            with Image.open(source) as icon:
                rgba = icon.convert("RGBA")
            flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            flat.alpha_composite(rgba)
            path = folder / f"{context}-{source.stem}.png"
            flat.convert("RGB").save(path)
            samples.append(Sample(path, label))
    return samples, list(ICON_CONTEXTS)


def few_shot(
    samples: list[Sample], classes: int, shots: int, val_per_class: int, seed: int
) -> tuple[list[Sample], list[Sample]]:
    order = np.random.default_rng(seed).permutation(len(samples))
    train: list[Sample] = []
    val: list[Sample] = []
    taken = [0] * classes
    for index in order:
        sample = samples[index]
        count = taken[sample.label]
        if count < shots:
            train.append(sample)
        elif count < shots + val_per_class:
            val.append(sample)
        taken[sample.label] += 1
    return train, val


def thaw_accuracy(
    train: list[Sample], val: list[Sample], classes: list[str], seed: int, **settings: Any
) -> float:
    # As the service compiles a job's plan: with the training split's size, which sets the
    # head stage's passes over the cached features.
    plan = compile_plan(
        TransferConfig(
            base_model=BASE_MODEL,
            num_classes=len(classes),
            train_size=len(train),
            seed=seed,
            **settings,
        )
    )
    result = run(plan, train=train, val=val, classes=classes)
    # With `tta`, the final validation's views averaged (metrics.tta); else the single view.
    tta = result.metrics.get("tta")
    return float(tta["val_accuracy"] if tta else result.metrics["val_accuracy"])


class _Images(Dataset[tuple[Tensor, int]]):
    def __init__(self, samples: list[Sample], transform: v2.Compose) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        sample = self.samples[index]
        with Image.open(sample.path) as image:
            return self.transform(image.convert("RGB")), sample.label


def hand_recipe_accuracy(
    train: list[Sample], val: list[Sample], classes: list[str], seed: int, epochs: int = 6
) -> float:
    """What a careful engineer writes by hand; see the module's doc."""
    torch.manual_seed(seed)
    info = get_base_model_info(BASE_MODEL)
    size, mean, std = info.input_size, list(info.mean), list(info.std)
    augmented = v2.Compose(
        [
            v2.PILToTensor(),
            v2.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )
    plain = v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize((size, size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )
    backbone = build_backbone(BASE_MODEL, pretrained=True, weights_dir=None)
    head = nn.Linear(info.feature_dim, len(classes))
    model = nn.Sequential(backbone, head)
    loader = DataLoader(_Images(train, augmented), batch_size=32, shuffle=True)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    groups = [modules for _, modules in backbone.groups()]

    def train_epochs(optimizer: torch.optim.Optimizer, count: int, backbone_trains: bool) -> None:
        total = count * len(loader)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total))
        )
        for _ in range(count):
            model.train()
            if not backbone_trains:
                backbone.eval()
            # Few images per batch: keep the pretrained BatchNorm statistics.
            for module in backbone.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
            for images, labels in loader:
                loss = loss_fn(model(images), labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()

    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    train_epochs(torch.optim.AdamW(head.parameters(), lr=1e-3), 1, backbone_trains=False)
    for parameter in backbone.parameters():
        parameter.requires_grad_(True)
    top = 1e-4
    param_groups: list[dict[str, Any]] = [{"params": head.parameters(), "lr": top}]
    for depth, modules in enumerate(reversed(groups), start=1):
        params = [p for module in modules for p in module.parameters()]
        param_groups.append({"params": params, "lr": top / 2.6**depth})
    train_epochs(torch.optim.AdamW(param_groups), epochs - 1, backbone_trains=True)

    model.eval()
    hits = 0
    with torch.no_grad():
        for images, labels in DataLoader(_Images(val, plain), batch_size=64):
            probabilities = model(images).softmax(1) + model(images.flip(3)).softmax(1)
            hits += int((probabilities.argmax(1) == labels).sum())
    return hits / len(val)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--shots", type=int, default=5, help="Training images per class.")
    parser.add_argument("--val", type=int, default=20, help="Validation images per class.")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    has_tta = "tta" in {item.name for item in fields(TransferSettings)}
    default_level = TransferSettings().augment
    rows: list[tuple[str, dict[str, Any] | None]] = [("thaw defaults", {})]
    # The defaults row already measures the default level.
    rows += [(f"augment={level}", {"augment": level}) for level in LEVELS if level != default_level]
    if has_tta:
        rows.append(("thaw defaults + tta", {"tta": "flip"}))
    with tempfile.TemporaryDirectory(prefix="thaw-quality-") as scratch:
        datasets = {
            "digits": digits_dataset(Path(scratch) / "digits"),
            "icons": icons_dataset(Path(scratch) / "icons"),
        }
        results: dict[tuple[str, str], list[float]] = {}
        seconds: dict[tuple[str, str], float] = {}
        for name, (samples, classes) in datasets.items():
            for seed in range(args.seeds):
                train, val = few_shot(samples, len(classes), args.shots, args.val, seed)
                for row, settings in [*rows, ("hand recipe", None)]:
                    started = time.perf_counter()
                    accuracy = (
                        hand_recipe_accuracy(train, val, classes, seed)
                        if settings is None
                        else thaw_accuracy(train, val, classes, seed, **settings)
                    )
                    elapsed = time.perf_counter() - started
                    results.setdefault((name, row), []).append(accuracy)
                    seconds[(name, row)] = seconds.get((name, row), 0.0) + elapsed
                    print(
                        f"{name} seed {seed} {row}: {accuracy:.3f} ({elapsed:.0f}s; "
                        f"{len(train)} train, {len(val)} val)",
                        flush=True,
                    )
    names = list(datasets)
    print(
        f"\nfew-shot validation accuracy, mean of {args.seeds} seeds "
        f"({args.shots} shots/class, {BASE_MODEL}; the defaults train with augment="
        f"{default_level}); wall seconds summed over seeds"
    )
    print(f"{'recipe':<24}" + "".join(f"{n:>10}{'s':>7}" for n in names))
    for row in [*(r for r, _ in rows), "hand recipe"]:
        cells = "".join(
            f"{np.mean(results[(n, row)]):>10.3f}{seconds[(n, row)]:>7.0f}" for n in names
        )
        print(f"{row:<24}{cells}")
    if not has_tta:
        print("(no tta column: TransferSettings has no `tta` setting on this build)")
    for name in names:
        gap = np.mean(results[(name, "thaw defaults")]) - np.mean(results[(name, "hand recipe")])
        print(f"{name}: thaw defaults - hand recipe = {gap:+.3f}")


if __name__ == "__main__":
    main()
