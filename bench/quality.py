"""Accuracy of thaw's defaults against a careful hand-written recipe, on real images, at a
few and at many images per class.

Datasets, built at run time (nothing large is committed):
- `digits`: sklearn's 8x8 digit scans (10 classes), as PNGs;
- `icons`: the installed 48px icons of the Adwaita and Oxygen themes (Debian packages
  `adwaita-icon-theme`, `oxygen-icon-theme`), labelled by their context folder (actions, apps,
  devices, mimetypes, status: the contexts with at least 120 icons), flattened on white. A
  different need from digits: drawings whose class is what they show, where mirroring changes
  nothing.
Each dataset is split per setting of `--shots`: that many training images per class, up to
`--val` per class for validation, per seed a different draw. Few shots train at the base
model's input size for 6 epochs; from `MANY_SHOTS` per class, at 64 px for 8 epochs (thaw
and the hand recipe alike), as a user with a thousand images would.

Rows, per dataset and setting (mean validation accuracy over seeds):
- `thaw defaults`: a spec with only the base model, the epochs and the image size (defaults
  otherwise, which follow the training split's size: `extra.defaults` in the plan; where they
  augment with flips, as at 100 per class, they average the image and its mirror too);
- `thaw defaults + tta`: the same with `tta: flip` set (the hand recipe's flip TTA), reading
  the accuracy of the averaged views (at 100 per class, what the defaults choose already);
- `stepped head`: the defaults with `solve_head: false` (the head stage stepped by AdamW, as
  before heads were solved);
- `feature_extraction`: the frozen backbone's solved linear head alone;
- `hand recipe`: plain PyTorch on the same backbone and weights: random resized crop and
  flip, label smoothing 0.1, one epoch of head warm-up then the whole network at
  discriminative rates (÷2.6 per group), AdamW and cosine decay, frozen BatchNorm, flip
  test-time augmentation.

Run as `.venv/bin/python bench/quality.py [--seeds 2] [--shots 5,100]`. Target: thaw's
defaults >= the hand recipe on both datasets at every setting.
"""

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from worker.engine import Sample, TransferConfig, build_backbone, compile_plan, run
from worker.engine.modalities.image.preprocessing import ImageModelInput
from worker.engine.modalities.image.tta import evaluate_tta
from worker.engine.refit import refit
from worker.engine.zoo import get_base_model_info

BASE_MODEL = "efficientnet_lite0"
ICON_ROOTS = (Path("/usr/share/icons/Adwaita/48x48"), Path("/usr/share/icons/oxygen/base/48x48"))
ICON_CONTEXTS = ("actions", "apps", "devices", "mimetypes", "status")
MANY_SHOTS = 20
"""From this many training images per class a setting trains at `MANY_SHOTS_SIZE` px for
`MANY_SHOTS_EPOCHS` epochs."""
MANY_SHOTS_SIZE = 64
MANY_SHOTS_EPOCHS = 8
FEW_SHOTS_EPOCHS = 6


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
    missing = [str(root) for root in ICON_ROOTS if not root.is_dir()]
    if missing:
        raise SystemExit(
            f"no icons at {', '.join(missing)}: apt-get install adwaita-icon-theme "
            "oxygen-icon-theme"
        )
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for label, context in enumerate(ICON_CONTEXTS):
        for theme, root in enumerate(ICON_ROOTS):
            for source in sorted((root / context).glob("*.png")):
                with Image.open(source) as icon:
                    rgba = icon.convert("RGBA")
                flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                flat.alpha_composite(rgba)
                path = folder / f"{context}-{theme}-{source.stem}.png"
                flat.convert("RGB").save(path)
                samples.append(Sample(path, label))
    return samples, list(ICON_CONTEXTS)


def split(
    samples: list[Sample],
    classes: int,
    shots: int,
    val_per_class: int,
    test_per_class: int,
    seed: int,
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """Per class: `shots` training images, then up to `val_per_class` for validation and up to
    `test_per_class` held out for the score (which no run sees: thaw chooses on validation)."""
    order = np.random.default_rng(seed).permutation(len(samples))
    parts: tuple[list[Sample], list[Sample], list[Sample]] = ([], [], [])
    taken = [0] * classes
    for index in order:
        sample = samples[index]
        count = taken[sample.label]
        for part, limit in zip(
            parts,
            (shots, shots + val_per_class, shots + val_per_class + test_per_class),
            strict=True,
        ):
            if count < limit:
                part.append(sample)
                break
        taken[sample.label] += 1
    return parts


def thaw_accuracy(
    train: list[Sample],
    val: list[Sample],
    test: list[Sample],
    classes: list[str],
    seed: int,
    **settings: Any,
) -> float:
    """Held-out accuracy of the model thaw publishes for this spec (with `tta`, of the
    averaged views; with `refit`, of the model refit on train + validation)."""
    # As the service compiles a job's plan: with the training split's size, which sets the
    # data-dependent defaults.
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
    if plan.refit:
        result = refit(plan, result, train=train, val=val, classes=classes)
    summary, _ = evaluate_tta(result.model, test, plan, torch.device("cpu"))
    return float(summary["val_accuracy"])


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
    train: list[Sample],
    val: list[Sample],
    classes: list[str],
    seed: int,
    *,
    epochs: int,
    image_size: int | None,
) -> float:
    """What a careful engineer writes by hand; see the module's doc."""
    torch.manual_seed(seed)
    info = get_base_model_info(BASE_MODEL)
    reads = ImageModelInput.of(info)
    size, mean, std = image_size or reads.input_size, list(reads.mean), list(reads.std)
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


ROWS: tuple[tuple[str, dict[str, Any] | None], ...] = (
    ("thaw defaults", {}),
    ("thaw defaults + tta", {"tta": "flip"}),
    ("thaw defaults + refit", {"refit": True}),
    ("stepped head", {"solve_head": False}),
    ("feature_extraction", {"strategy": "feature_extraction"}),
    ("hand recipe", None),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds from this one on")
    parser.add_argument(
        "--shots", default="5,100", help="Training images per class, settings by commas."
    )
    parser.add_argument("--val", type=int, default=20, help="Validation images per class.")
    parser.add_argument("--test", type=int, default=40, help="Held-out images per class.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default=",".join(row for row, _ in ROWS))
    parser.add_argument("--datasets", default="digits,icons", help="Datasets, by commas.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shots = [int(count) for count in args.shots.split(",")]
    rows = [(row, settings) for row, settings in ROWS if row in args.rows.split(",")]
    with tempfile.TemporaryDirectory(prefix="thaw-quality-") as scratch:
        builders = {"digits": digits_dataset, "icons": icons_dataset}
        datasets = {name: builders[name](Path(scratch) / name) for name in args.datasets.split(",")}
        results: dict[tuple[str, str], list[float]] = {}
        seconds: dict[tuple[str, str], float] = {}
        for count in shots:
            many = count >= MANY_SHOTS
            epochs = MANY_SHOTS_EPOCHS if many else FEW_SHOTS_EPOCHS
            image_size = MANY_SHOTS_SIZE if many else None
            for name, (samples, classes) in datasets.items():
                column = f"{name}@{count}"
                for seed in range(args.first_seed, args.first_seed + args.seeds):
                    train, val, test = split(
                        samples, len(classes), count, args.val, args.test, seed
                    )
                    for row, settings in rows:
                        started = time.perf_counter()
                        accuracy = (
                            hand_recipe_accuracy(
                                train, test, classes, seed, epochs=epochs, image_size=image_size
                            )
                            if settings is None
                            else thaw_accuracy(
                                train,
                                val,
                                test,
                                classes,
                                seed,
                                epochs=epochs,
                                **({"image_size": image_size} if image_size else {}),
                                **settings,
                            )
                        )
                        elapsed = time.perf_counter() - started
                        results.setdefault((column, row), []).append(accuracy)
                        seconds[(column, row)] = seconds.get((column, row), 0.0) + elapsed
                        print(
                            f"{column} seed {seed} {row}: {accuracy:.3f} ({elapsed:.0f}s; "
                            f"{len(train)} train, {len(val)} val, {len(test)} test)",
                            flush=True,
                        )
    columns = list(dict.fromkeys(column for column, _ in results))
    print(
        f"\nheld-out accuracy, mean of {args.seeds} seeds ({BASE_MODEL}; <set>@<training "
        f"images per class>; from {MANY_SHOTS} per class at {MANY_SHOTS_SIZE} px for "
        f"{MANY_SHOTS_EPOCHS} epochs, else the input size for {FEW_SHOTS_EPOCHS}); wall "
        "seconds summed over seeds"
    )
    print(f"{'recipe':<24}" + "".join(f"{c:>12}{'s':>6}" for c in columns))
    for row, _ in rows:
        cells = "".join(
            f"{np.mean(results[(c, row)]):>12.3f}{seconds[(c, row)]:>6.0f}" for c in columns
        )
        print(f"{row:<24}{cells}")
    if any(row == "hand recipe" for row, _ in rows):
        for column in columns:
            gap = np.mean(results[(column, "thaw defaults")]) - np.mean(
                results[(column, "hand recipe")]
            )
            print(f"{column}: thaw defaults - hand recipe = {gap:+.3f}")


if __name__ == "__main__":
    main()
