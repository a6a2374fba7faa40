"""Datasets: accept an upload, then (in the worker) extract, validate and split it."""

import itertools
import json
import logging
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import update

from service.bounds import MAX_SEED
from service.context import AppContext
from service.datasets import lease
from service.datasets.ingest import (
    SUPPORTED_UPLOADS,
    DatasetRejectedError,
    IngestLimits,
    IngestResult,
    MissingColumnError,
    TextColumns,
    check_csv_header,
    detect_upload,
    ingest_upload,
    iter_text_rows,
    skipped_dict,
    unpack_image_shards,
    write_image_shards,
)
from service.datasets.ingest.results import MAX_LISTED_SKIPPED
from service.datasets.lengths import summarise_token_lengths
from service.datasets.schemas import BaseModelScoreOut, TransferabilityIn, TransferabilityOut
from service.errors import ApiError
from service.queues import INGEST_TASK, worker_identity
from service.storage import LocalCache
from service.storage.cache import entry_id
from service.tables import Dataset, Tenant
from service.uploads import ReceivedUpload
from worker import engine
from worker.engine.modalities import dataset_modality, modality_for, upload_modality

logger = logging.getLogger(__name__)

DEFAULT_TEXT_BASE_MODEL = "minilm_l6"
"""The text model whose token lengths a text dataset reports when ingested."""
_TOKENIZE_CHUNK = 10_000


def archive_key(dataset_id: str) -> str:
    return f"uploads/{dataset_id}/archive"


def files_prefix(dataset_id: str) -> str:
    return f"datasets/{dataset_id}/files"


def manifest_key(dataset_id: str) -> str:
    return f"datasets/{dataset_id}/manifest.json"


@dataclass(frozen=True)
class DatasetItem:
    """One labelled item of a dataset, whatever its modality."""

    id: str
    """Stable across reads: an image's manifest path; a text's `row:<ordinal>` among the
    dataset's rows in shard order (shards are never rewritten, so the ordinal never moves)."""
    label: int
    split: str
    content: Path | str
    """What a model reads: an image's local file, or the text itself."""


@dataclass(frozen=True)
class DatasetItems:
    modality: str
    classes: list[str]
    items: list[DatasetItem]
    unlabelled: list[str]
    """Texts kept without a label (for a language-model stage); none for images."""


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
    # Short first: `int()` of a 16 KiB field of digits would raise, not answer.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 10 or int(raw) > MAX_SEED:
        raise ApiError(
            422, "invalid_request", f"seed: an integer from 0 to {MAX_SEED}", param="seed"
        )
    return int(raw)


def _form_text(fields: dict[str, str], name: str, default: str) -> str:
    value = fields.get(name, "").strip() or default
    if len(value) > 200:
        raise ApiError(422, "invalid_request", f"{name}: at most 200 characters", param=name)
    return value


def _form_unlabelled(fields: dict[str, str]) -> bool:
    value = fields.get("unlabelled") or "keep"
    if value not in ("keep", "skip"):
        raise ApiError(422, "invalid_request", "unlabelled: `keep` or `skip`", param="unlabelled")
    return value == "keep"


def _sniff(upload: ReceivedUpload, columns: TextColumns) -> str | None:
    """The upload's modality when its kind already tells (None for an archive); 4xx for
    anything that is no dataset, or a CSV without the columns asked for."""
    head = upload.head
    kind = detect_upload(head)
    if kind is None:
        raise ApiError(
            415,
            "unsupported_upload",
            f"The upload is not a dataset: send {SUPPORTED_UPLOADS}.",
            param="file",
        )
    if kind == "csv":
        try:
            check_csv_header(head, columns)
        except MissingColumnError as exc:
            raise ApiError(422, "bad_header", exc.message, param=exc.param) from None
    taker = upload_modality(kind)
    return None if taker is None else taker.name


def create_dataset(
    *, context: AppContext, tenant: Tenant, dataset_id: str, upload: ReceivedUpload
) -> Dataset:
    """Record a dataset whose upload is already in the store (at `archive_key(dataset_id)`)
    and queue its ingestion; a refused upload leaves neither the object nor a row."""
    fields = upload.fields
    try:
        seed = _form_seed(fields)
        val_fraction = _form_float(fields, "val_fraction", 0.2, 0.0, 0.9)
        columns = TextColumns(
            text=_form_text(fields, "text_column", "text"),
            label=_form_text(fields, "label_column", "label"),
        )
        keep_unlabelled = _form_unlabelled(fields)
        modality = _sniff(upload, columns)
        name = (fields.get("name") or Path(upload.filename).name.split(".")[0] or "dataset")[:200]
        dataset = Dataset(
            id=dataset_id,
            tenant_id=tenant.id,
            name=name,
            upload_bytes=upload.size,
            val_fraction=val_fraction,
            seed=seed,
            modality=modality,
            text_column=columns.text,
            label_column=columns.label,
            keep_unlabelled=keep_unlabelled,
        )
        # The upload is stored before the row exists: no transaction stays open across it.
        with context.db.session() as session:
            session.add(dataset)
            session.commit()
    except BaseException:
        context.store.delete(upload.key)
        raise
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
        max_text_field_bytes=settings.max_text_field_bytes,
    )


def process_upload(*, context: AppContext, dataset_id: str) -> None:
    """Extract, validate and split an uploaded archive; records `ready` or `failed`. This
    worker holds the dataset's lease meanwhile (`lease.py`)."""
    with context.db.session() as session:
        attempt = lease.claim(
            session,
            dataset_id=dataset_id,
            owner=worker_identity(),
            lease=timedelta(seconds=context.settings.lease_seconds),
        )
        dataset = session.get(Dataset, dataset_id) if attempt is not None else None
        if attempt is None or dataset is None:
            logger.info("dataset %s is not waiting for a worker; nothing to do", dataset_id)
            return
        val_fraction, seed = dataset.val_fraction, dataset.seed
        columns = TextColumns(
            text=dataset.text_column or "text", label=dataset.label_column or "label"
        )
        keep_unlabelled = dataset.keep_unlabelled
    try:
        with lease.IngestLease(context, dataset_id=dataset_id, attempt=attempt) as held:
            _ingest(
                context,
                dataset_id,
                attempt=attempt,
                held=held,
                columns=columns,
                val_fraction=val_fraction,
                seed=seed,
                keep_unlabelled=keep_unlabelled,
            )
    except lease.IngestLostError:
        logger.info(
            "dataset %s attempt %d stopped: another attempt ingests it", dataset_id, attempt
        )


def _ingest(
    context: AppContext,
    dataset_id: str,
    *,
    attempt: int,
    held: lease.IngestLease,
    columns: TextColumns,
    val_fraction: float,
    seed: int,
    keep_unlabelled: bool,
) -> None:
    work = Path(tempfile.mkdtemp(dir=context.scratch_dir, prefix=f"ingest-{dataset_id}-"))
    last_report = 0.0

    def report(done: int, total: int) -> None:
        nonlocal last_report
        held.check()
        if time.monotonic() - last_report < 1.0:
            return
        last_report = time.monotonic()
        with context.db.session() as progress_session:
            progress_session.execute(
                update(Dataset)
                .where(*lease.holds(dataset_id, attempt))
                .values(progress=round(done / max(total, 1), 4))
            )
            progress_session.commit()

    try:
        with context.store.local_file(archive_key(dataset_id), work) as upload:
            result = ingest_upload(
                upload,
                work / "files",
                columns=columns,
                limits=ingest_limits(context),
                val_fraction=val_fraction,
                seed=seed,
                keep_unlabelled=keep_unlabelled,
                progress=report,
            )
    except DatasetRejectedError as exc:
        _finish(
            context, dataset_id, attempt=attempt, status="failed", error=(exc.code, exc.message)
        )
        return
    except lease.IngestLostError:
        shutil.rmtree(work, ignore_errors=True)
        raise
    except Exception:
        logger.exception("ingestion of %s crashed", dataset_id)
        _finish(
            context,
            dataset_id,
            attempt=attempt,
            status="failed",
            error=("ingest_error", "The archive could not be processed; the error was logged."),
        )
        return
    finally:
        if not (work / "files").exists():
            shutil.rmtree(work, ignore_errors=True)

    try:
        modality = modality_for(result.modality)
        lengths = (
            _ingest_token_lengths(context, result, work / "files")
            if modality.reads_token_lengths
            else None
        )
        stored = work / "files"
        if modality.packs_files:
            stored = work / "shards"
            result = replace(
                result, shards=write_image_shards(work / "files", result.samples, stored)
            )
        held.check()
        context.store.put_dir(files_prefix(dataset_id), stored)
        context.store.put_bytes(manifest_key(dataset_id), json.dumps(result.to_manifest()).encode())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _finish(
        context, dataset_id, attempt=attempt, status="ready", result=result, token_lengths=lengths
    )


def _ingest_token_lengths(
    context: AppContext, result: IngestResult, root: Path
) -> dict[str, Any] | None:
    """The default text model's length summary, when its tokenizer is installed here."""
    weights_dir = context.settings.resolved_weights_dir
    if not engine.weights_available(DEFAULT_TEXT_BASE_MODEL, weights_dir):
        logger.info("no %s tokenizer here; no token lengths at ingest", DEFAULT_TEXT_BASE_MODEL)
        return None
    return _token_length_summary(context, result, root, DEFAULT_TEXT_BASE_MODEL)


def _token_length_summary(
    context: AppContext, result: IngestResult, root: Path, base_model: str
) -> dict[str, Any]:
    weights_dir = context.settings.resolved_weights_dir
    lengths: list[int] = []
    chunk: list[str] = []
    # Tokenized a chunk at a time: only the lengths of the whole dataset are kept.
    for row in iter_text_rows(root, result.shards):
        chunk.append(row.text)
        if len(chunk) == _TOKENIZE_CHUNK:
            lengths += engine.token_lengths(base_model, chunk, weights_dir)
            chunk = []
    if chunk:
        lengths += engine.token_lengths(base_model, chunk, weights_dir)
    max_length = engine.token_limit(base_model)
    return summarise_token_lengths(base_model=base_model, lengths=lengths, max_length=max_length)


def token_lengths_for(*, context: AppContext, dataset: Dataset, base_model: str) -> dict[str, Any]:
    """A text dataset's token-length summary against `base_model` (a text zoo model)."""
    require_ready(dataset, needed_by="token lengths")
    held = dataset_modality(dataset.modality)
    if not held.reads_token_lengths:
        raise ApiError(
            422,
            "wrong_modality",
            f"Dataset {dataset.id} holds {held.items}; token lengths are for text datasets.",
            "base_model",
        )
    if dataset.token_lengths is not None and dataset.token_lengths["base_model"] == base_model:
        return dataset.token_lengths
    info = _base_model_info(base_model, param="base_model")
    if not (model := modality_for(info.modality)).reads_token_lengths:
        raise ApiError(
            422,
            "wrong_modality",
            f"{base_model} is {model.a_model} model; choose a text model (GET /v1/base-models).",
            "base_model",
        )
    if not engine.weights_available(base_model, context.settings.resolved_weights_dir):
        raise ApiError(
            422,
            "weights_unavailable",
            f"The tokenizer of {base_model} is not installed on this server.",
            "base_model",
        )
    manifest, root = load_manifest(context=context, dataset_id=dataset.id)
    return _token_length_summary(context, manifest, root, base_model)


def _base_model_info(name: str, *, param: str) -> Any:
    try:
        return engine.get_base_model_info(name)
    except engine.UnknownBaseModelError as exc:
        raise ApiError(422, "unknown_base_model", f"{exc}", param) from None


def require_modality(dataset: Dataset, *, base_model: str, modality: str) -> None:
    """422 naming `base_model` when a job would train a `modality` model on the other kind."""
    if dataset.modality is not None and dataset.modality != modality:
        raise ApiError(
            422,
            "wrong_modality",
            f"base_model: {base_model} is {modality_for(modality).a_model} "
            f"model but dataset {dataset.id} holds {dataset.modality}s; choose "
            f"{modality_for(dataset.modality).a_model} base model "
            "(GET /v1/base-models).",
            "base_model",
        )


def _finish(
    context: AppContext,
    dataset_id: str,
    *,
    attempt: int,
    status: str,
    result: IngestResult | None = None,
    error: tuple[str, str] | None = None,
    token_lengths: dict[str, Any] | None = None,
) -> None:
    values: dict[str, Any] = {
        "status": status,
        "progress": 1.0,
        "lease_owner": None,
        "lease_expires_at": None,
    }
    if error is not None:
        values["error_code"], values["error_message"] = error
    if result is not None:
        values.update(
            modality=result.modality,
            classes=result.classes,
            class_counts=result.class_counts,
            num_labelled=result.num_labelled,
            num_unlabelled=result.unlabelled,
            token_lengths=token_lengths,
            skipped=[skipped_dict(s) for s in result.skipped[:MAX_LISTED_SKIPPED]],
            num_skipped=result.num_skipped,
        )
    with context.db.session() as session:
        # Fenced: an attempt that lost the dataset to a later one records nothing.
        recorded = session.execute(
            update(Dataset).where(*lease.holds(dataset_id, attempt)).values(**values)
        ).rowcount  # type: ignore[attr-defined]
        session.commit()
    if not recorded:
        logger.info(
            "dataset %s attempt %d lost it; its result is not recorded", dataset_id, attempt
        )
        return
    # The archive was only needed to build the files; a redelivered task finds the dataset
    # no longer `processing` and never reads it again.
    context.store.delete(archive_key(dataset_id))
    logger.info("dataset %s is %s", dataset_id, status)


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
    data = dataset_items(context=context, dataset_id=dataset.id)
    train = [item for item in data.items if item.split == "train"]
    scored, scores = rank_base_models(
        context=context,
        modality=data.modality,
        items=train,
        base_models=request.base_models,
        max_images=request.max_images,
        image_size=request.image_size,
        seed=request.seed,
        param="base_models",
    )
    return TransferabilityOut(
        dataset_id=dataset.id,
        images=scored,
        ranking=[BaseModelScoreOut.model_validate(asdict(score)) for score in scores],
    )


def rank_base_models(
    *,
    context: AppContext,
    modality: str,
    items: list[DatasetItem],
    base_models: list[str],
    max_images: int,
    image_size: int | None,
    seed: int,
    param: str,
    max_length: int | None = None,
) -> tuple[int, list[Any]]:
    """Score each base model's frozen features on at most `max_images` of these items (images,
    or texts tokenized to `max_length`; drawn per class with `seed`): how many were scored,
    and the scores, best LogME first. The caller chooses the items, so an experiment can
    leave its test split out."""
    weights_dir = context.settings.resolved_weights_dir
    for index, name in enumerate(base_models):
        where = f"{param}[{index}]"
        try:
            info = engine.get_base_model_info(name)
        except engine.UnknownBaseModelError as exc:
            raise ApiError(422, "unknown_base_model", f"{exc}", where) from None
        if info.modality != modality:
            raise ApiError(
                422,
                "wrong_modality",
                f"{where}: {name} is {modality_for(info.modality).a_model} "
                f"model but the dataset holds {modality}s.",
                where,
            )
        if not engine.weights_available(name, weights_dir):
            raise ApiError(
                422,
                "weights_unavailable",
                f"Pretrained weights for {name} are not installed on this server (looked in "
                f"{weights_dir}); transferability scores pretrained features.",
                where,
            )
    chosen = _stratified_subset(items, limit=max_images, seed=seed)
    samples = [modality_for(modality).sample(str(item.content), item.label) for item in chosen]
    scores = [
        engine.score_base_model(
            name,
            samples,
            weights_dir=weights_dir,
            image_size=image_size,
            max_length=max_length,
            seed=seed,
        )
        for name in base_models
    ]
    return len(samples), sorted(scores, key=lambda score: score.logme, reverse=True)


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
    manifest = IngestResult.from_manifest(
        json.loads(context.store.get_bytes(manifest_key(dataset_id)))
    )
    if modality_for(manifest.modality).packs_files and manifest.shards:
        return manifest, _unpacked_images(context, dataset_id, manifest)
    # Text shards are read in place; images ingested before version 3 are one object each.
    return manifest, context.store.local_path(files_prefix(dataset_id))


def _unpacked_images(context: AppContext, dataset_id: str, manifest: IngestResult) -> Path:
    """The image shards' content as a folder in this host's cache (`THAW_CACHE_DIR`),
    extracted once per host and shared by its processes; addressed by the shards' content
    versions, so it never needs invalidating."""
    store, settings = context.store, context.settings
    keys = [f"{files_prefix(dataset_id)}/{shard.path}" for shard in manifest.shards]
    where = settings.storage_url or str(settings.resolved_storage_dir)
    entry = entry_id(where, *keys, *(store.stat(key).version for key in keys))
    cache = LocalCache(settings.resolved_cache_dir, budget_bytes=settings.cache_bytes)

    def fill(folder: Path) -> None:
        unpack_image_shards(
            manifest.shards,
            lambda name: store.open(f"{files_prefix(dataset_id)}/{name}"),
            folder,
        )

    return cache.get(entry, fill)


def text_row_id(ordinal: int) -> str:
    return f"row:{ordinal}"


def dataset_items(*, context: AppContext, dataset_id: str) -> DatasetItems:
    """Every labelled item of the dataset with its id, label and split: the one view an
    experiment carves its test split from and a trial trains, validates and tests on."""
    manifest, root = load_manifest(context=context, dataset_id=dataset_id)
    if not modality_for(manifest.modality).inline_items:
        items = [
            DatasetItem(id=s.path, label=s.label, split=str(s.split), content=root / s.path)
            for s in manifest.samples
        ]
        return DatasetItems(manifest.modality, manifest.classes, items, [])
    items = []
    unlabelled: list[str] = []
    for ordinal, row in enumerate(iter_text_rows(root, manifest.shards)):
        if row.label is None:
            unlabelled.append(row.text)
        else:
            items.append(DatasetItem(text_row_id(ordinal), row.label, str(row.split), row.text))
    return DatasetItems(manifest.modality, manifest.classes, items, unlabelled)


def load_text_rows(
    *, context: AppContext, dataset_id: str
) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]], list[str]]:
    """A text dataset's classes, its train and val (text, label) rows, its unlabelled texts."""
    data = dataset_items(context=context, dataset_id=dataset_id)
    rows = {
        split: [(str(item.content), item.label) for item in data.items if item.split == split]
        for split in ("train", "val")
    }
    return data.classes, rows["train"], rows["val"], data.unlabelled


def text_samples(*, context: AppContext, dataset_id: str, limit: int) -> list[dict[str, Any]]:
    """The first `limit` kept rows of a text dataset, with their class names, for display."""
    manifest, root = load_manifest(context=context, dataset_id=dataset_id)
    rows = itertools.islice(iter_text_rows(root, manifest.shards), limit)
    return [
        {
            "text": row.text,
            "label": None if row.label is None else manifest.classes[row.label],
            "split": row.split,
        }
        for row in rows
    ]
