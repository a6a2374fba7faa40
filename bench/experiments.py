"""What an experiment costs against the same trials run by hand, and against scoring first.

In a temporary data folder, through the real API and job path (one in-process worker running one
job at a time, as one training worker does), on sklearn's digits:

1. an experiment of the default strategies on one backbone: its wall time from the request to
   its end (every trial trained, scored on the test split, the experiment ended);
2. the same trials (same specs) submitted as separate jobs one after another: the sum of their
   wall times from submit to end;
3. `POST /v1/datasets/{id}/transferability` for the same backbone: its wall time.

It prints experiment ÷ separate jobs (the issue's target is ≤ 0.8, from sharing frozen
features across trials) and transferability ÷ experiment (target ≤ 0.05), then the
leaderboard and the diagnosis it got.

Interleaved, so that a shared machine's changing load falls on both sides alike: each trial
runs, then the separate job of the same strategy, then the next trial (the experiment starts
its next trial when one ends, and in-process that trial waits, queued, for the bench's next
call). The experiment's time is the sum of its own segments (the creation request, each
trial's job from its claim to its end, the experiment moving on included, and the final
read of its leaderboard); a separate job's, from its submission to its end. It prints both
wall and process CPU time per pair (CPU time counts the work, less what waits for other
processes), and the torch threads (`--threads`, default 1: on a loaded machine more threads
than free cores spin while they wait for each other, and wall times swing by whole multiples).

Same data on both sides: the separate jobs train on a second dataset made of the same images
less the experiment's test split (uploaded after the experiment carved it; the bench prints
both sides' train and val counts, which the upload's own stratified split may make differ by
an item per class). Separate jobs on the whole dataset would train and validate on a quarter
more images than the trials, which flattered the experiment. The trials still do one thing
the separate jobs do not: score their model on the test split (the leaderboard's test
columns and latency), which is the experiment's own work and counted in its time.

Shared features: the experiment's trials share frozen-backbone features through the store
(`features/<dataset>/` in the artifact store). The reference is the same trials run as a user
would run them without thaw's experiment, each computing its own features, so every separate
job starts with its dataset's folder emptied (a fresh store): the separate jobs never read
features another job computed. An untimed one-epoch job runs first (its features then
removed), so neither side pays for loading torch, the weights and the images for the first
time.

    .venv/bin/python bench/experiments.py [--classes 4] [--per-class 40] [--epochs 3]
        [--image-size 64] [--base-model efficientnet_lite0] [--device cpu] [--threads 1]

The machine may be shared: compare figures within one run.
"""

import argparse
import io
import logging
import os
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from service.auth.service import create_key
from service.cli import migrate_database
from service.context import AppContext
from service.datasets.service import DatasetItem, dataset_items, process_upload
from service.experiments.schemas import DEFAULT_STRATEGIES
from service.experiments.split import decode_test_split
from service.main import create_app
from service.settings import Settings
from service.tables import Experiment, Job
from worker import jobs
from worker.feature_store import FEATURES_PREFIX, dataset_features_prefix


def digits_zip(classes: int, per_class: int, *, leaving_out: frozenset[str] = frozenset()) -> bytes:
    """The first `per_class` digits of each of the first `classes` classes, less the images
    whose file names are in `leaving_out`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).astype(np.uint8)
    buffer = io.BytesIO()
    taken: dict[int, int] = {}
    with zipfile.ZipFile(buffer, "w") as archive:
        for index, (image, label) in enumerate(zip(images, digits.target, strict=True)):
            label = int(label)
            if label >= classes or taken.get(label, 0) >= per_class:
                continue
            taken[label] = taken.get(label, 0) + 1
            if f"{index:05d}.png" in leaving_out:
                continue
            png = io.BytesIO()
            Image.fromarray(image).save(png, format="PNG")
            archive.writestr(f"digits/digit_{label}/{index:05d}.png", png.getvalue())
    return buffer.getvalue()


def upload(client: TestClient, context: AppContext, auth: dict[str, str], archive: bytes) -> str:
    created = client.post("/v1/datasets", headers=auth, files={"file": ("d.zip", archive)})
    created.raise_for_status()
    dataset: str = created.json()["id"]
    process_upload(context=context, dataset_id=dataset)
    return dataset


def split_counts(items: list[DatasetItem]) -> str:
    counts = Counter(item.split for item in items)
    return f"{counts['train']} train, {counts['val']} val"


@dataclass
class Spent:
    """Wall and process CPU seconds spent on one side."""

    wall: float = 0.0
    cpu: float = 0.0

    @contextmanager
    def timing(self) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall += time.perf_counter() - wall
            self.cpu += time.process_time() - cpu


def run_queued(context: AppContext) -> int:
    """Run queued jobs one at a time until none is left; returns how many ran."""
    ran = 0
    while run_next(context):
        ran += 1
    return ran


def run_next(context: AppContext) -> bool:
    """Run the oldest queued job, if any (as a one-job-at-a-time worker would pick it)."""
    with context.db.session() as session:
        job_id = session.scalar(
            select(Job.id).where(Job.status == "queued").order_by(Job.created_at)
        )
    if job_id is None:
        return False
    jobs.execute(context, job_id=job_id)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--base-model", default="efficientnet_lite0")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="thaw-bench-") as folder:
        settings = Settings(data_dir=Path(folder), reaper_interval_seconds=3600)
        migrate_database(settings)
        with TestClient(create_app(settings)) as client:
            context: AppContext = client.app.state.context  # type: ignore[attr-defined]
            with context.db.session() as session:
                _, key = create_key(session, tenant_name="bench")
            auth = {"Authorization": f"Bearer {key}"}
            dataset = upload(client, context, auth, digits_zip(args.classes, args.per_class))
            settings_shared = {
                "epochs": args.epochs,
                "batch_size": 16,
                "lr": 0.01,
                "image_size": args.image_size,
                "seed": 1,
                "device": args.device,
            }
            print(
                f"{args.base_model}, {args.classes} classes x {args.per_class} images, "
                f"{args.epochs} epochs at {args.image_size} px on {args.device} "
                f"({args.threads} torch threads), strategies: {', '.join(DEFAULT_STRATEGIES)}"
            )
            print(f"load average at start: {os.getloadavg()}")
            warm_up = client.post(
                "/v1/jobs",
                headers=auth,
                json={
                    **settings_shared,
                    "epochs": 1,
                    "dataset": dataset,
                    "model": "bench-warm-up",
                    "base_model": args.base_model,
                    "strategy": "feature_extraction",
                },
            )
            warm_up.raise_for_status()
            run_queued(context)
            context.store.delete(FEATURES_PREFIX)

            experiment_spent = Spent()
            with experiment_spent.timing():
                created = client.post(
                    "/v1/experiments",
                    headers=auth,
                    json={
                        "dataset": dataset,
                        "model": "bench-exp",
                        "base_models": [args.base_model],
                        "settings": settings_shared,
                        "budget": {"max_parallel": 1},
                    },
                )
                created.raise_for_status()
            experiment_id = created.json()["id"]

            with context.db.session() as session:
                split_key = session.get_one(Experiment, experiment_id).test_split_key
            held_out = set(decode_test_split(context.store.get_bytes(split_key)))
            items = dataset_items(context=context, dataset_id=dataset).items
            trial_items = [item for item in items if item.id not in held_out]
            same_images = upload(
                client,
                context,
                auth,
                digits_zip(
                    args.classes,
                    args.per_class,
                    leaving_out=frozenset(Path(item).name for item in held_out),
                ),
            )
            separate_items = dataset_items(context=context, dataset_id=same_images).items
            assert {Path(i.id).name for i in separate_items} == {
                Path(i.id).name for i in trial_items
            }
            print(
                f"trials: {split_counts(trial_items)} (test {len(held_out)}); "
                f"separate jobs: {split_counts(separate_items)}"
            )

            pairs: list[tuple[str, Spent, Spent]] = []
            for strategy in DEFAULT_STRATEGIES:
                trial = Spent()
                with trial.timing():
                    assert run_next(context), f"the experiment queued no {strategy} trial"
                separate = Spent()
                # A fresh store: no separate job reads features another job computed.
                context.store.delete(dataset_features_prefix(same_images))
                with separate.timing():
                    submitted = client.post(
                        "/v1/jobs",
                        headers=auth,
                        json={
                            **settings_shared,
                            "dataset": same_images,
                            "model": "bench-separate",
                            "base_model": args.base_model,
                            "strategy": strategy,
                        },
                    )
                    submitted.raise_for_status()
                    # By id: the experiment's next trial is already queued, and older.
                    jobs.execute(context, job_id=submitted.json()["id"])
                pairs.append((strategy, trial, separate))
            assert not run_next(context), "a job was left queued"

            with experiment_spent.timing():
                experiment: dict[str, Any] = client.get(
                    f"/v1/experiments/{experiment_id}", headers=auth
                ).json()
            assert experiment["status"] == "succeeded", experiment["trials"]

            began = time.perf_counter()
            scored = client.post(
                f"/v1/datasets/{dataset}/transferability",
                headers=auth,
                json={"base_models": [args.base_model], "image_size": args.image_size},
            )
            scored.raise_for_status()
            transferability_seconds = time.perf_counter() - began

    separate_spent = Spent()
    for _, trial, separate in pairs:
        experiment_spent.wall += trial.wall
        experiment_spent.cpu += trial.cpu
        separate_spent.wall += separate.wall
        separate_spent.cpu += separate.cpu
    print(f"load average at end: {os.getloadavg()}")
    print(
        f"\n{'strategy':<18} {'trial s':>8} {'job s':>8} {'ratio':>6} {'trial cpu':>10} "
        f"{'job cpu':>8} {'ratio':>6}"
    )
    for name, trial, separate in pairs:
        print(
            f"{name:<18} {trial.wall:8.1f} {separate.wall:8.1f} "
            f"{trial.wall / separate.wall:6.2f} {trial.cpu:10.1f} {separate.cpu:8.1f} "
            f"{trial.cpu / separate.cpu:6.2f}"
        )
    print(
        f"\nexperiment wall time:            {experiment_spent.wall:8.1f} s "
        f"(cpu {experiment_spent.cpu:.1f} s)"
    )
    print(
        f"same trials as separate jobs:    {separate_spent.wall:8.1f} s "
        f"(cpu {separate_spent.cpu:.1f} s)"
    )
    print(f"transferability call:            {transferability_seconds:8.1f} s")
    print(
        f"experiment / separate jobs:      {experiment_spent.wall / separate_spent.wall:8.2f} "
        f"(cpu {experiment_spent.cpu / separate_spent.cpu:.2f}; target <= 0.8)"
    )
    print(
        "transferability / experiment:    "
        f"{transferability_seconds / experiment_spent.wall:8.3f} (target <= 0.05)"
    )
    print(f"\nleaderboard (test split: {experiment['test_size']} items)")
    print(
        f"{'#':>2} {'strategy':<18} {'val':>6} {'test':>6} {'95% interval':>15} {'F1':>5} "
        f"{'best ep':>7} {'wall s':>7} {'trainable':>10} {'ms/item':>8}"
    )
    for row in experiment["leaderboard"]:
        low, high = row["test_accuracy_interval"]
        print(
            f"{row['rank']:>2} {row['strategy']:<18} {row['val_accuracy']:6.3f} "
            f"{row['test_accuracy']:6.3f} {f'{low:.3f}-{high:.3f}':>15} "
            f"{row['test_macro_f1']:5.3f} {row['epochs_to_best']:>7} {row['wall_seconds']:7.1f} "
            f"{row['trainable_parameters']:>10,} {row['latency_ms_per_item']:8.2f}"
        )
    print("\ndiagnosis")
    for line in experiment["diagnosis"]["summary"]:
        print(f"- {line}")


if __name__ == "__main__":
    main()
