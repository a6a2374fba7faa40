"""Datasets: accept an upload, then (in the worker) extract, validate and split it."""

import json
import logging
import random
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from service.context import AppContext
from service.datasets.ingest import DatasetRejectedError, IngestLimits, IngestResult, ingest_archive
from service.datasets.schemas import BaseModelScoreOut, TransferabilityIn, TransferabilityOut
from service.errors import ApiError
from service.queues import INGEST_TASK
from service.tables import Dataset, Tenant
from service.uploads import ReceivedUpload
from worker import engine

logger = logging.getLogger(__name__)


MAX_SEED = 2**31 - 1


def archive_key(dataset_id: str) -> str:
    return f"uploads/{dataset_id}/archive"


def files_prefix(dataset_id: str) -> str:
    return f"datasets/{dataset_id}/files"


def manifest_key(dataset_id: str) -> str:
    return f"datasets/{dataset_id}/manifest.json"


def _form_float(
    fields: dict[str, str], name: str, default: float, low: float, high: float
) -> float:
    raw = fields.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(422, "invalid_request", f"{name}: not a number", param=name) from None
    if not low < value < high:
        raise ApiError(
            422, "invalid_request", f"{name}: must be between {low} and {high}", param=name
        )
    return value


def _form_seed(fields: dict[str, str]) -> int:
    raw = fields.get("seed") or "0"
    if not raw.isdigit() or int(raw) > MAX_SEED:
        raise ApiError(
            422, "invalid_request", f"seed: an integer from 0 to {MAX_SEED}", param="seed"
        )
    return int(raw)


def create_dataset(*, context: AppContext, tenant: Tenant, upload: ReceivedUpload) -> Dataset:
    fields = upload.fields
    try:
        seed = _form_seed(fields)
        val_fraction = _form_float(fields, "val_fraction", 0.2, 0.0, 0.9)
    except ApiError:
        upload.path.unlink(missing_ok=True)
        raise
    name = (fields.get("name") or Path(upload.filename).name.split(".")[0] or "dataset")[:200]
    dataset = Dataset(
        tenant_id=tenant.id,
        name=name,
        upload_bytes=upload.size,
        val_fraction=val_fraction,
        seed=seed,
    )
    with context.db.session() as session:
        session.add(dataset)
        session.flush()
        context.store.put_file(archive_key(dataset.id), upload.path)
        session.commit()
    _enqueue_ingest(context, dataset)
    return dataset


def _enqueue_ingest(context: AppContext, dataset: Dataset) -> None:
    try:
        context.celery.send_task(INGEST_TASK, args=[dataset.id])
    except Exception as exc:
        logger.exception("could not enqueue ingestion of %s", dataset.id)
        with context.db.session() as session:
            row = session.get(Dataset, dataset.id)
            if row is not None:
                row.status, row.error_code = "failed", "broker_unavailable"
                row.error_message = "The task queue is unreachable; upload the dataset again."
                session.commit()
        raise ApiError(
            503, "broker_unavailable", "The task queue is unreachable; try again shortly."
        ) from exc


def ingest_limits(context: AppContext) -> IngestLimits:
    settings = context.settings
    return IngestLimits(
        max_members=settings.max_archive_members,
        max_member_bytes=settings.max_member_bytes,
        max_total_bytes=settings.max_extracted_bytes,
        max_image_pixels=settings.max_image_pixels,
    )


def process_upload(*, context: AppContext, dataset_id: str) -> None:
    """Extract, validate and split an uploaded archive; records `ready` or `failed`."""
    with context.db.session() as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None or dataset.status != "processing":
            logger.info("dataset %s is not waiting for processing; nothing to do", dataset_id)
            return
        val_fraction, seed = dataset.val_fraction, dataset.seed

    work = Path(tempfile.mkdtemp(dir=context.scratch_dir, prefix=f"ingest-{dataset_id}-"))
    last_report = 0.0

    def report(done: int, total: int) -> None:
        nonlocal last_report
        if time.monotonic() - last_report < 1.0:
            return
        last_report = time.monotonic()
        with context.db.session() as progress_session:
            row = progress_session.get(Dataset, dataset_id)
            if row is not None:
                row.progress = round(done / max(total, 1), 4)
                progress_session.commit()

    try:
        result = ingest_archive(
            context.store.local_path(archive_key(dataset_id)),
            work / "files",
            limits=ingest_limits(context),
            val_fraction=val_fraction,
            seed=seed,
            progress=report,
        )
    except DatasetRejectedError as exc:
        _finish(context, dataset_id, status="failed", error=(exc.code, exc.message))
        return
    except Exception:
        logger.exception("ingestion of %s crashed", dataset_id)
        _finish(
            context,
            dataset_id,
            status="failed",
            error=("ingest_error", "The archive could not be processed; the error was logged."),
        )
        return
    finally:
        if not (work / "files").exists():
            shutil.rmtree(work, ignore_errors=True)

    context.store.put_dir(files_prefix(dataset_id), work / "files")
    context.store.put_bytes(manifest_key(dataset_id), json.dumps(result.to_manifest()).encode())
    shutil.rmtree(work, ignore_errors=True)
    _finish(context, dataset_id, status="ready", result=result)


def _finish(
    context: AppContext,
    dataset_id: str,
    *,
    status: str,
    result: IngestResult | None = None,
    error: tuple[str, str] | None = None,
) -> None:
    with context.db.session() as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None:
            return
        dataset.status = status
        dataset.progress = 1.0
        if error is not None:
            dataset.error_code, dataset.error_message = error
        if result is not None:
            dataset.classes = result.classes
            dataset.class_counts = result.class_counts
            dataset.num_images = len(result.samples)
            dataset.skipped = [_skipped_dict(s) for s in result.skipped]
        session.commit()
    # The archive was only needed to build the files; a redelivered task finds the dataset
    # no longer `processing` and never reads it again.
    context.store.delete(archive_key(dataset_id))
    logger.info("dataset %s is %s", dataset_id, status)


def _skipped_dict(skipped: Any) -> dict[str, str]:
    return {"path": skipped.path, "code": skipped.code, "reason": skipped.reason}


def require_ready(dataset: Dataset, *, needed_by: str, param: str | None = None) -> None:
    """409 unless the dataset finished ingesting successfully."""
    if dataset.status != "ready":
        detail = f": {dataset.error_message}" if dataset.status == "failed" else ""
        raise ApiError(
            409,
            "dataset_not_ready",
            f"Dataset {dataset.id} is {dataset.status}{detail}; {needed_by} need a ready dataset.",
            param,
        )


def score_transferability(
    *, context: AppContext, dataset: Dataset, request: TransferabilityIn
) -> TransferabilityOut:
    """Rank base models for this dataset from their frozen features (LogME, linear probe)."""
    require_ready(dataset, needed_by="transferability scores")
    weights_dir = context.settings.resolved_weights_dir
    for index, name in enumerate(request.base_models):
        param = f"base_models[{index}]"
        try:
            engine.get_base_model_info(name)
        except engine.UnknownBaseModelError as exc:
            raise ApiError(422, "unknown_base_model", f"{exc}", param) from None
        if not engine.weights_available(name, weights_dir):
            raise ApiError(
                422,
                "weights_unavailable",
                f"Pretrained weights for {name} are not installed on this server (looked in "
                f"{weights_dir}); transferability scores pretrained features.",
                param,
            )
    manifest, root = load_manifest(context=context, dataset_id=dataset.id)
    train = [s for s in manifest.samples if s.split == "train"]
    chosen = _stratified_subset(train, limit=request.max_images, seed=request.seed)
    samples = [engine.Sample(path=root / s.path, label=s.label) for s in chosen]
    scores = [
        engine.score_base_model(
            name,
            samples,
            weights_dir=weights_dir,
            image_size=request.image_size,
            seed=request.seed,
        )
        for name in request.base_models
    ]
    ranking = sorted(scores, key=lambda score: score.logme, reverse=True)
    return TransferabilityOut(
        dataset_id=dataset.id,
        images=len(samples),
        ranking=[BaseModelScoreOut.model_validate(asdict(score)) for score in ranking],
    )


def _stratified_subset(samples: list[Any], *, limit: int, seed: int) -> list[Any]:
    """At most `limit` samples, each class keeping its share, the same for the same seed."""
    if len(samples) <= limit:
        return samples
    rng = random.Random(seed)
    by_class: dict[int, list[Any]] = {}
    for sample in samples:
        by_class.setdefault(sample.label, []).append(sample)
    chosen: list[Any] = []
    for members in by_class.values():
        share = max(1, round(limit * len(members) / len(samples)))
        chosen += rng.sample(members, min(share, len(members)))
    return chosen


def load_manifest(*, context: AppContext, dataset_id: str) -> tuple[IngestResult, Path]:
    """The dataset's samples and the local folder their paths are relative to."""
    manifest = json.loads(context.store.get_bytes(manifest_key(dataset_id)))
    return IngestResult.from_manifest(manifest), context.store.local_path(files_prefix(dataset_id))
