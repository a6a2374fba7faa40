"""One entry point for every upload: recognise what it holds by its content, then ingest it as
an image or a text dataset."""

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from service.datasets.ingest.archive import (
    SUPPORTED_ARCHIVES,
    Candidate,
    archive_format,
    clear_dest,
    list_members,
    prepare_dest,
    screen,
)
from service.datasets.ingest.images import check_image_formats, ingest_images
from service.datasets.ingest.results import (
    DatasetRejectedError,
    IngestLimits,
    IngestResult,
    check_arguments,
)
from service.datasets.ingest.text import (
    SUPPORTED_TEXT,
    TextColumns,
    build_text_dataset,
    ingest_text_file,
    read_folder_rows,
    sniff_text_format,
)

logger = logging.getLogger(__name__)

UploadKind = Literal["archive", "csv", "jsonl"]
SNIFF_BYTES = 64 * 1024
SUPPORTED_UPLOADS = f"an image archive ({SUPPORTED_ARCHIVES}) or {SUPPORTED_TEXT}"


def detect_upload(head: bytes) -> UploadKind | None:
    """What an upload starting with `head` (its first SNIFF_BYTES) holds, or None."""
    if archive_format(head) is not None:
        return "archive"
    return sniff_text_format(head)


def ingest_upload(
    upload: Path,
    dest: Path,
    *,
    columns: TextColumns = TextColumns(),
    limits: IngestLimits = IngestLimits(),
    val_fraction: float = 0.2,
    seed: int = 0,
    keep_unlabelled: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> IngestResult:
    """Ingest any supported upload into `dest` (missing or empty); see `ingest_archive`."""
    with upload.open("rb") as handle:
        kind = detect_upload(handle.read(SNIFF_BYTES))
    if kind is None:
        raise DatasetRejectedError(
            "unsupported_upload", f"The upload is none of {SUPPORTED_UPLOADS}."
        )
    if kind == "archive":
        return ingest_archive(
            upload,
            dest,
            limits=limits,
            val_fraction=val_fraction,
            seed=seed,
            keep_unlabelled=keep_unlabelled,
            progress=progress,
        )
    check_arguments(limits, val_fraction)
    created = prepare_dest(dest)
    try:
        result = ingest_text_file(
            upload,
            dest,
            fmt=kind,
            columns=columns,
            limits=limits,
            val_fraction=val_fraction,
            seed=seed,
            keep_unlabelled=keep_unlabelled,
            progress=progress,
        )
    except BaseException as exc:
        clear_dest(dest, created)
        _log_rejection(upload, exc)
        raise
    _log_result(upload, result)
    return result


def ingest_archive(
    archive: Path,
    dest: Path,
    *,
    limits: IngestLimits = IngestLimits(),
    val_fraction: float = 0.2,
    seed: int = 0,
    keep_unlabelled: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> IngestResult:
    """Extract `archive` into `dest` (missing or empty) and split it.

    Images land as `dest/<class>/<file>`; an archive of mostly .txt files is a text dataset
    whose rows land in shards. Raises DatasetRejectedError when the archive as a whole is
    unusable; `dest` is then left without any of the archive's content, as it is after any
    other exception.
    """
    check_arguments(limits, val_fraction)
    check_image_formats(limits)
    created = prepare_dest(dest)
    try:
        with contextlib.ExitStack() as stack:
            members = list_members(archive, stack, limits.max_members)
            candidates, skipped = screen(members)
            if _holds_texts(candidates):
                result = build_text_dataset(
                    read_folder_rows(candidates, limits, skipped, progress),
                    dest.resolve(),
                    limits=limits,
                    val_fraction=val_fraction,
                    seed=seed,
                    keep_unlabelled=keep_unlabelled,
                    skipped=skipped,
                )
            else:
                result = ingest_images(
                    candidates,
                    skipped,
                    members=len(members),
                    dest=dest.resolve(),
                    limits=limits,
                    val_fraction=val_fraction,
                    seed=seed,
                    progress=progress,
                )
    except BaseException as exc:
        clear_dest(dest, created)
        _log_rejection(archive, exc)
        raise
    _log_result(archive, result)
    return result


def _holds_texts(candidates: list[Candidate]) -> bool:
    # Judged by the members' names: a stray README among the .txt files does not make it an
    # image archive, and a labels.csv among images does not make it a text one.
    texts = sum(1 for c in candidates if c.path.lower().endswith(".txt"))
    return texts > len(candidates) - texts


def _log_rejection(upload: Path, exc: BaseException) -> None:
    if isinstance(exc, DatasetRejectedError):
        logger.info("rejected %s (%s): %s", upload, exc.code, exc.message)


def _log_result(upload: Path, result: IngestResult) -> None:
    logger.info(
        "ingested %s: %s, %d classes, %d labelled, %d unlabelled, %d skipped",
        upload,
        result.modality,
        len(result.classes),
        len(result.samples) or result.num_labelled,
        result.unlabelled,
        result.num_skipped,
    )
