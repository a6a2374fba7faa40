"""What a job does differently when it is an experiment's trial, kept apart from `jobs.py`:

- `without_test_split`: the experiment's test split leaves the dataset's items (images or texts)
  before the training and validation sets are built, so no trial trains or selects (early
  stopping) on it;
- `evaluate`: a trial's scoring of its exported model (the trained model in memory, whose
  weights it holds: nothing is built or loaded again):
  - `evaluate_on_test`: the model answers every test item (its file `test_predictions.json` is
    published with the version) and the test metrics join the version's metrics: accuracy
    with its bootstrap 95 % interval, loss, macro F1, and the median latency of a one-item
    prediction, timed on the scoring's own first items (asked one at a time), so the latency
    column costs no prediction beyond the scoring;
  - `evaluate_on_old_task`: a trial that starts from a registered model (a parent) is also
    scored on the parent's own task, on the parent's validation items: the parent's accuracy
    there, and what the trial kept of it (an `lwf` trial with the old head it kept, any other
    with the parent's head on the trial's backbone, as Li & Hoiem judge fine-tuning);
- `after_epoch`: in an experiment that prunes, a trial is judged at each rung (successive
  halving), so a hopeless one stops at the next step;
- `advance_after_job`: a trial's end moves its experiment on; an update's job is scored.

A job that is no trial gets every item and no test metrics.
"""

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from service.context import AppContext
from service.datasets.service import DatasetItem, dataset_items
from service.experiments import service as experiments
from service.experiments.split import TEST_PREDICTIONS_FILE, decode_test_split
from service.experiments.statistics import bootstrap_interval, macro_f1
from service.tables import Experiment, ExperimentTrial, ModelVersion
from worker import updates
from worker.engine import Plan, Predictor, TransferModel
from worker.engine.modalities import modality_for
from worker.engine.predictor import Top

logger = logging.getLogger(__name__)

EVALUATION_BATCH = 64
LATENCY_ITEMS = 6
"""The first test items are scored one at a time, and all but the first (the warm-up: the
first call after loading pays for allocating the kernels) timed for the latency column; the
rest are scored in batches. A median of five is stable enough to compare trials and keeps a
trial's scoring to a few calls more than its batches."""
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
    context: AppContext, *, job_id: str, items: list[DatasetItem]
) -> tuple[list[DatasetItem], list[DatasetItem]]:
    """The dataset's items without the experiment's test split, and the test items (none for
    a job that is no trial)."""
    key = _test_split_key(context, job_id)
    if key is None:
        return items, []
    held_out = set(decode_test_split(context.store.get_bytes(key)))
    kept = [item for item in items if item.id not in held_out]
    test = [item for item in items if item.id in held_out]
    logger.info("job %s: trial; %d items held out for testing", job_id, len(test))
    return kept, test


def _answer(
    predictor: Predictor, items: list[DatasetItem], *, top_k: int, task: str | None = None
) -> list[Top]:
    """Each item read and answered by the model, through its modality."""
    modality = modality_for(predictor.exported.modality)
    inputs = [modality.item_input(item.content) for item in items]
    return predictor.predict(inputs, top_k=top_k, task=task)


def accuracy(
    predictor: Predictor, items: list[DatasetItem], classes: list[str], task: str | None
) -> float:
    """Top-1 accuracy of `predictor`'s `task` on `items` (labelled by index into `classes`)."""
    correct = 0
    for start in range(0, len(items), EVALUATION_BATCH):
        batch = items[start : start + EVALUATION_BATCH]
        answers = _answer(predictor, batch, top_k=1, task=task)
        correct += sum(
            top[0][0] == classes[item.label] for item, top in zip(batch, answers, strict=True)
        )
    return correct / len(items)


def evaluate_on_test(
    predictor: Predictor, model_dir: Path, test: list[DatasetItem], *, classes: list[str]
) -> dict[str, Any]:
    """Score `predictor` (loaded from the exported `model_dir`) on the test split; writes
    `test_predictions.json` into `model_dir` and returns the test metrics (empty when there is
    no test split)."""
    if not test:
        return {}
    index = {label: position for position, label in enumerate(classes)}
    answers: list[Top] = []
    latencies: list[float] = []
    modality = modality_for(predictor.exported.modality)
    for item in test[:LATENCY_ITEMS]:
        # Read before the clock starts: the latency is the model's, not the file's.
        one = modality.item_input(item.content)
        began = time.perf_counter()
        answers.extend(predictor.predict([one], top_k=len(classes), task=None))
        latencies.append(time.perf_counter() - began)
    for start in range(LATENCY_ITEMS, len(test), EVALUATION_BATCH):
        batch = test[start : start + EVALUATION_BATCH]
        answers.extend(_answer(predictor, batch, top_k=len(classes)))
    items: list[dict[str, Any]] = [
        {
            "item": item.id,
            "label": item.label,
            "predicted": index[ranked[0][0]],
            "probability": dict(ranked).get(classes[item.label], 0.0),
        }
        for item, ranked in zip(test, answers, strict=True)
    ]
    correct = [float(item["predicted"] == item["label"]) for item in items]
    low, high = bootstrap_interval(correct)
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
        # A one-item test split has only its warm-up call to time.
        "latency_ms_per_item": 1000 * statistics.median(latencies[1:] or latencies),
    }


def evaluate_on_old_task(
    context: AppContext,
    *,
    plan: Plan,
    trial: Predictor,
    parent_dir: Path | None,
    test: list[DatasetItem],
) -> dict[str, Any]:
    """A trial from a parent model, scored on the parent's newest task with the parent's
    validation items: `old_task_parent_accuracy` (the parent itself) and `old_task_accuracy`
    (this trial, `trial`: the predictor `evaluate_on_test` scored). Empty for a job that is no
    trial or has no parent."""
    parent_version_id = plan.extra.get("parent_version_id")
    if not test or parent_dir is None or parent_version_id is None:
        return {}

    def parent_dataset(session: Any) -> str:
        return session.get_one(ModelVersion, parent_version_id).dataset_id

    dataset_id = context.db.retrying(parent_dataset, for_seconds=context.settings.lease_seconds)
    data = dataset_items(context=context, dataset_id=dataset_id)
    held_out = [item for item in data.items if item.split == "val"]
    if not held_out:
        return {}
    parent_accuracy, trial_accuracy = score_old_task(
        Predictor.load(parent_dir), trial, held_out, data.classes
    )
    return {
        "old_task_accuracy": trial_accuracy,
        "old_task_parent_accuracy": parent_accuracy,
        "old_task_items": len(held_out),
    }


def score_old_task(
    parent: Predictor, trial: Predictor, held_out: list[DatasetItem], classes: list[str]
) -> tuple[float, float]:
    """(parent, trial) accuracy on the parent's newest task over `held_out`. An `lwf` trial
    answers that task with the old head it kept; any other is judged with the parent's head
    on the trial's backbone, so `parent`'s backbone is replaced (score it first)."""
    task = list(parent.tasks)[-1]
    parent_accuracy = accuracy(parent, held_out, classes, task)
    if task in list(trial.tasks)[:-1]:
        # LwF kept the old head beside the new one (and trained it to keep its answers).
        return parent_accuracy, accuracy(trial, held_out, classes, task)
    # The parent's head on what this trial did to the backbone.
    parent.model.backbone.load_state_dict(trial.model.backbone.state_dict())
    return parent_accuracy, accuracy(parent, held_out, classes, task)


def evaluate(
    context: AppContext,
    *,
    plan: Plan,
    model_dir: Path,
    parent_dir: Path | None,
    test: list[DatasetItem],
    classes: list[str],
    model: TransferModel,
) -> dict[str, Any]:
    """A trial's test metrics and (from a parent) old-task metrics, of the model exported in
    `model_dir`: `model`, the trained model whose weights it holds, is scored as it is (on the
    CPU, as predict serves it), not built and loaded again; empty for a job that is no trial."""
    if not test:
        return {}
    predictor = Predictor.load(model_dir, model=model)
    return evaluate_on_test(predictor, model_dir, test, classes=classes) | evaluate_on_old_task(
        context, plan=plan, trial=predictor, parent_dir=parent_dir, test=test
    )


def after_epoch(context: AppContext, *, job_id: str) -> None:
    """An epoch ended: a trial of an experiment that prunes may be judged at this rung."""
    try:
        experiments.advance_after_job(context, job_id=job_id, pruning_only=True)
    except Exception:
        logger.exception("job %s: could not judge it for pruning; the reaper will", job_id)


def advance_after_job(context: AppContext, *, job_id: str) -> None:
    """Move the job's experiment on, or score the update it trained for (`worker/updates.py`);
    a failure here never fails the job (the reaper retries an experiment)."""
    try:
        experiments.advance_after_job(context, job_id=job_id)
    except Exception:
        logger.exception("job %s: could not advance its experiment; the reaper will", job_id)
    updates.score_after_job(context, job_id=job_id)
