"""`lora` against `fine_tune`, one table: accuracy, trainable share, published artifact size
and peak memory, on images (sklearn's digits, few-shot, efficientnet_lite0) and texts (the
Debian descriptions fixture, all-MiniLM-L6-v2).

Each (dataset, strategy) trains in its own process, so its peak resident memory (RSS, the
whole process: data, model, optimizer, training) is its own. Artifacts: the files
`export_model` writes (weights, config.json, a text model's tokenizer), not the merged
`model.onnx`, which is as large for both.

Run as `.venv/bin/python bench/lora.py [--epochs 3] [--shots 10] [--image-size 96]`.
Targets (issue 26): accuracy within 1 point of fine_tune, <= 3 % trainable, artifacts <= 10 %
of fine_tune's, peak RSS below fine_tune's.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

STRATEGIES = ("fine_tune", "lora")


def _image_job(args: argparse.Namespace, folder: Path) -> tuple[Any, Any, Any, list[str]]:
    sys.path.insert(0, str(Path(__file__).parent))
    from quality import digits_dataset, split

    samples, classes = digits_dataset(folder / "digits")
    train, val, _ = split(samples, len(classes), args.shots, args.val, 0, seed=0)
    common = {"base_model": "efficientnet_lite0", "image_size": args.image_size}
    return common, train, val, classes


def _text_job(args: argparse.Namespace, folder: Path) -> tuple[Any, Any, Any, list[str]]:
    sys.path.insert(0, str(Path(__file__).parent))
    from text import read_fixture, stratified_split

    from worker.engine.modalities.text.zoo import MINILM

    samples, classes = read_fixture()
    train, val = stratified_split(samples, 0.25, seed=0)
    per_class = args.texts_per_class
    kept: dict[int, int] = {}
    small = []
    for sample in train:
        if kept.get(sample.label, 0) < per_class:
            small.append(sample)
            kept[sample.label] = kept.get(sample.label, 0) + 1
    common = {"base_model": MINILM, "max_length": 64}
    return common, small, val[: args.val * len(classes)], classes


def one(kind: str, strategy: str, args: argparse.Namespace) -> dict[str, Any]:
    from worker.engine import TransferConfig, build_model, compile_plan, describe_plan, run
    from worker.engine.export import export_model

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        job = _image_job if kind == "image" else _text_job
        common, train, val, classes = job(args, folder)
        plan = compile_plan(
            TransferConfig(
                strategy=strategy,  # type: ignore[arg-type]
                num_classes=len(classes),
                epochs=args.epochs,
                batch_size=16,
                seed=0,
                **common,
            )
        )
        preview = describe_plan(plan, build_model(plan, weights_dir=None, pretrained=False))
        trainable = max(s["trainable_parameters"] / s["total_parameters"] for s in preview)
        result = run(plan, train=train, val=val, classes=classes)
        out = folder / "export"
        export_model(result, plan, out)
        size = sum(path.stat().st_size for path in out.iterdir())
    return {
        "accuracy": result.metrics["val_accuracy"],
        "trainable": trainable,
        "artifacts": size,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "train": len(train),
        "val": len(val),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--shots", type=int, default=10, help="digits per class to train on")
    parser.add_argument("--val", type=int, default=20, help="validation items per class")
    parser.add_argument("--texts-per-class", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kinds", nargs="+", default=["image", "text"])
    parser.add_argument("--one", nargs=2, metavar=("KIND", "STRATEGY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        kind, strategy = args.one
        print(json.dumps(one(kind, strategy, args)))
        return
    print("| data | strategy | val accuracy | trainable | artifacts | peak RSS |")
    print("|---|---|---|---|---|---|", flush=True)
    for kind in args.kinds:
        for strategy in STRATEGIES:
            done = subprocess.run(
                [sys.executable, __file__, *sys.argv[1:], "--one", kind, strategy],
                capture_output=True,
                text=True,
                check=True,
            )
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(
                f"| {kind} ({row['train']} train / {row['val']} val) | {strategy} | "
                f"{row['accuracy']:.3f} | {100 * row['trainable']:.2f} % | "
                f"{row['artifacts'] / 1e6:.2f} MB | {row['rss_mb']:.0f} MB |",
                flush=True,
            )


if __name__ == "__main__":
    main()
