"""What a job does differently when it is an experiment's trial, kept apart from `jobs.py`:

- `without_test_split`: the experiment's test split leaves the manifest before the training and
  validation sets are built, so no trial trains or selects (early stopping) on it;
- `evaluate_on_test`: the exported model answers every test item (its file
  `test_predictions.json` is published with the version) and the test metrics join the
  version's metrics: accuracy with its bootstrap 95 % interval, loss, macro F1, and the median
  latency of a one-item prediction;
- `after_epoch`: in an experiment that prunes, a trial is judged at each rung (successive
  halving), so a hopeless one stops at the next step;
- `advance_after_job`: a trial's end moves its experiment on.

A job that is no trial gets its manifest unchanged and no test metrics.
"""

import dataclasses
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import select

from service.context import AppContext
from service.datasets.ingest import IngestResult, Sample
from service.experiments import service as experiments
from service.experiments.split import TEST_PREDICTIONS_FILE, decode_test_split
from service.experiments.statistics import bootstrap_interval, macro_f1
from service.tables import Experiment, ExperimentTrial
from worker.engine import Predictor

logger = logging.getLogger(__name__)

EVALUATION_BATCH = 64
LATENCY_ITEMS = 16
"""One-item predictions timed for the latency column (after one untimed warm-up)."""
PROBABILITY_FLOOR = 1e-12


def _test_split_key(context: AppContext, job_id: str) -> str | None:
    def read(session: Any) -> str | None:
        key: str | None = session.scalar(
            select(Experiment.test_split_key)
            .join(ExperimentTrial, ExperimentTrial.experiment_id == Experiment.id)
            .where(ExperimentTrial.job_id == job_id)
        )
        return key

    return context.db.retrying(read, for_seconds=context.settings.lease_seconds)


def without_test_split(
    context: AppContext, *, job_id: str, manifest: IngestResult
) -> tuple[IngestResult, list[Sample]]:
    """The manifest without the experiment's test split, and the test samples (none for a job
    that is no trial)."""
    key = _test_split_key(context, job_id)
    if key is None:
        return manifest, []
    held_out = set(decode_test_split(context.store.get_bytes(key)))
    kept = [s for s in manifest.samples if s.path not in held_out]
    test = [s for s in manifest.samples if s.path in held_out]
    logger.info("job %s: trial; %d samples held out for testing", job_id, len(test))
    return dataclasses.replace(manifest, samples=kept), test


def _image(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image


def evaluate_on_test(
    model_dir: Path, test: list[Sample], *, root: Path, classes: list[str]
) -> dict[str, Any]:
    """Score the exported model on the test split; writes `test_predictions.json` into
    `model_dir` and returns the test metrics (empty when there is no test split)."""
    if not test:
        return {}
    predictor = Predictor.load(model_dir)
    index = {label: position for position, label in enumerate(classes)}
    items: list[dict[str, Any]] = []
    for start in range(0, len(test), EVALUATION_BATCH):
        batch = test[start : start + EVALUATION_BATCH]
        answers = predictor.predict([_image(root / s.path) for s in batch], top_k=len(classes))
        for sample, ranked in zip(batch, answers, strict=True):
            probability = dict(ranked)
            items.append(
                {
                    "item": sample.path,
                    "label": sample.label,
                    "predicted": index[ranked[0][0]],
                    "probability": probability.get(classes[sample.label], 0.0),
                }
            )
    correct = [float(item["predicted"] == item["label"]) for item in items]
    low, high = bootstrap_interval(correct)
    latencies = []
    for sample in [test[0], *test[:LATENCY_ITEMS]]:
        image = _image(root / sample.path)
        began = time.perf_counter()
        predictor.predict([image], top_k=1)
        latencies.append(time.perf_counter() - began)
    (model_dir / TEST_PREDICTIONS_FILE).write_text(json.dumps({"items": items}) + "\n")
    return {
        "test_accuracy": float(np.mean(correct)),
        "test_accuracy_low": low,
        "test_accuracy_high": high,
        "test_loss": float(
            np.mean([-np.log(max(item["probability"], PROBABILITY_FLOOR)) for item in items])
        ),
        "test_macro_f1": macro_f1(
            [item["label"] for item in items], [item["predicted"] for item in items], len(classes)
        ),
        "test_items": len(items),
        "latency_ms_per_item": 1000 * statistics.median(latencies[1:]),
    }


def after_epoch(context: AppContext, *, job_id: str) -> None:
    """An epoch ended: a trial of an experiment that prunes may be judged at this rung."""
    try:
        experiments.advance_after_job(context, job_id=job_id, pruning_only=True)
    except Exception:
        logger.exception("job %s: could not judge it for pruning; the reaper will", job_id)


def advance_after_job(context: AppContext, *, job_id: str) -> None:
    """Move the job's experiment on; a failure here never fails the job (the reaper retries)."""
    try:
        experiments.advance_after_job(context, job_id=job_id)
    except Exception:
        logger.exception("job %s: could not advance its experiment; the reaper will", job_id)
