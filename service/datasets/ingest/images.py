"""Image datasets from a screened archive: which class each file belongs to (class folders or a
CSV manifest), extraction under the caps, and a full decode of every image that is kept."""

import csv
import io
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from PIL import Image, UnidentifiedImageError

from service.datasets.ingest.archive import (
    ByteBudget,
    Candidate,
    UnreadableMemberError,
    is_csv,
    is_valid_class_name,
    normalise,
    read_small,
    stream_to,
    wrapper_folder,
)
from service.datasets.ingest.results import (
    DatasetRejectedError,
    IngestLimits,
    IngestResult,
    Progress,
    Sample,
    SkipCode,
    SkippedFile,
    TextShard,
    pick_val,
    summary,
)

IMAGE_SHARD_BYTES = 64 * 2**20
"""About this many bytes of images per shard: an object store serves a few large objects far
faster than one small object per image."""
_PATH_COLUMNS = ("path", "filename", "image")
_MISSING_FILE = "The CSV lists a file that is not among the archive's usable files."
_DUPLICATE_ROW = "The CSV lists this path more than once; the first row is kept."
# Pillow reads this many bytes to pick a plugin; we reuse it to name formats it won't open.
_PILLOW_PREFIX = 16


# --- Layout: which class each file belongs to -----------------------------------------------


@dataclass(frozen=True)
class _Job:
    candidate: Candidate
    class_name: str
    target: str  # relative to dest, posix


def _plan(
    candidates: list[Candidate], limits: IngestLimits
) -> tuple[list[_Job], list[SkippedFile]]:
    """Assign every candidate a class and a target path, from folders or a CSV manifest."""
    wrapper = wrapper_folder([c.path for c in candidates])
    inner = {c.path: c.path.removeprefix(wrapper) for c in candidates}
    manifest = _find_manifest([c for c in candidates if "/" not in inner[c.path]])
    if manifest is None:
        return _plan_folders(candidates, inner)
    names = {c.path for c in candidates}
    labels, skipped = _read_manifest(manifest, wrapper, names, limits.max_member_bytes)
    jobs, unlabelled = _plan_from_labels([c for c in candidates if c is not manifest], labels)
    return jobs, skipped + unlabelled


def _find_manifest(root_files: list[Candidate]) -> Candidate | None:
    csvs = [c for c in root_files if is_csv(c.path)]
    named = [c for c in csvs if c.path.rsplit("/", 1)[-1].lower() == "labels.csv"]
    if len(named) == 1:
        return named[0]
    if len(csvs) <= 1:
        return csvs[0] if csvs else None
    found = ", ".join(sorted(c.member.name for c in csvs))
    raise DatasetRejectedError(
        "bad_manifest",
        f"Found several CSV files at the top of the archive ({found}); "
        "name the one that lists the labels labels.csv.",
    )


def _plan_folders(
    candidates: list[Candidate], inner: dict[str, str]
) -> tuple[list[_Job], list[SkippedFile]]:
    jobs: list[_Job] = []
    skipped: list[SkippedFile] = []
    for candidate in candidates:
        path = inner[candidate.path]
        if "/" not in path:
            skipped.append(
                SkippedFile(
                    candidate.member.name, "unlabelled", "The file is not in a class folder."
                )
            )
            continue
        jobs.append(_Job(candidate, path.split("/", 1)[0], path))
    return jobs, skipped


def _read_manifest(
    manifest: Candidate, wrapper: str, names: set[str], max_bytes: int
) -> tuple[dict[str, str], list[SkippedFile]]:
    """Map archive paths to labels; rows that cannot be used are reported."""
    labels: dict[str, str] = {}
    skipped: list[SkippedFile] = []
    for raw_path, label in _manifest_rows(manifest, max_bytes):
        key = _manifest_key(raw_path, wrapper, names)
        if key is None:
            skipped.append(SkippedFile(raw_path, "missing_file", _MISSING_FILE))
        elif not is_valid_class_name(label):
            reason = f"The label {label!r} cannot be used as a folder name."
            skipped.append(SkippedFile(raw_path, "bad_label", reason))
        elif key in labels:
            skipped.append(SkippedFile(raw_path, "duplicate", _DUPLICATE_ROW))
        else:
            labels[key] = label
    return labels, skipped


def _manifest_key(raw_path: str, wrapper: str, names: set[str]) -> str | None:
    # Spreadsheets written on Windows use backslashes; normalising afterwards still rejects
    # anything that climbs out. Paths may be relative to the CSV's folder or the archive root.
    path = normalise(raw_path.replace("\\", "/"))
    if path is None:
        return None
    return next((key for key in (wrapper + path, path) if key in names), None)


def _manifest_rows(manifest: Candidate, max_bytes: int) -> list[tuple[str, str]]:
    name = manifest.member.name
    try:
        text = read_small(manifest.member, max_bytes).decode("utf-8-sig")
        rows = [row for row in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in row)]
    except (UnicodeDecodeError, csv.Error, UnreadableMemberError) as exc:
        raise DatasetRejectedError("bad_manifest", f"{name} cannot be read: {exc}") from exc
    header = [cell.strip().lower() for cell in rows[0]] if rows else []
    path_column = next((header.index(col) for col in _PATH_COLUMNS if col in header), None)
    if path_column is None or "label" not in header:
        raise DatasetRejectedError(
            "bad_manifest",
            f"{name} needs a header row with the columns path,label "
            f"(or filename,label or image,label); found {','.join(header) or 'nothing'}.",
        )
    label_column = header.index("label")
    width = max(path_column, label_column) + 1
    return [
        (row[path_column].strip(), row[label_column].strip())
        for row in (row + [""] * (width - len(row)) for row in rows[1:])
    ]


def _plan_from_labels(
    candidates: list[Candidate], labels: dict[str, str]
) -> tuple[list[_Job], list[SkippedFile]]:
    jobs: list[_Job] = []
    skipped: list[SkippedFile] = []
    used: set[str] = set()
    for candidate in candidates:
        label = labels.get(candidate.path)
        if label is None:
            skipped.append(
                SkippedFile(candidate.member.name, "unlabelled", "The CSV does not list this file.")
            )
            continue
        target = _unique_target(label, candidate.path.rsplit("/", 1)[-1], used)
        used.add(target)
        jobs.append(_Job(candidate, label, target))
    return jobs, skipped


def _unique_target(label: str, basename: str, used: set[str]) -> str:
    # Files from different CSV folders are flattened into one class folder; keep both.
    stem, dot, suffix = basename.rpartition(".")
    if not stem:
        stem, dot, suffix = basename, "", ""
    target, n = f"{label}/{basename}", 1
    while target in used:
        target, n = f"{label}/{stem}_{n}{dot}{suffix}", n + 1
    return target


# --- Extraction and image checks --------------------------------------------------------------


def ingest_images(
    candidates: list[Candidate],
    skipped: list[SkippedFile],
    *,
    members: int,
    dest: Path,
    limits: IngestLimits,
    val_fraction: float,
    seed: int,
    progress: Callable[[int, int], None] | None,
) -> IngestResult:
    """Extract the screened `candidates` of an archive of `members` entries as images."""
    skipped = list(skipped)
    jobs, plan_skipped = _plan(candidates, limits)
    skipped += plan_skipped
    reporter = Progress(progress, members)
    done = members - len(jobs)
    reporter.update(done)
    budget = ByteBudget(limits.max_total_bytes)
    kept: list[_Job] = []
    for job in jobs:
        problem = _extract(job, dest, limits, budget)
        if problem is None:
            kept.append(job)
        else:
            skipped.append(SkippedFile(job.candidate.member.name, *problem))
        done += 1
        reporter.update(done)
    if not kept:
        raise DatasetRejectedError("no_images", f"No usable images were found. {summary(skipped)}")
    kept, dropped = _drop_small_classes(kept, dest, limits.min_images_per_class)
    _remove_empty_dirs(dest)
    return _build_result(kept, skipped + dropped, val_fraction, seed)


def _extract(
    job: _Job, dest: Path, limits: IngestLimits, budget: ByteBudget
) -> tuple[SkipCode, str] | None:
    target = dest.joinpath(*job.target.split("/"))
    if not target.resolve().is_relative_to(dest):
        return "unsafe_path", "The file would land outside the dataset folder."
    problem = stream_to(job.candidate.member, target, limits.max_member_bytes, budget)
    if problem is None:
        problem = _check_image(target, limits)
    if problem is not None:
        target.unlink(missing_ok=True)
    return problem


class ImageRejectedError(Exception):
    """One image is unusable; `code` is a skip code and the message says why."""

    def __init__(self, code: SkipCode, reason: str) -> None:
        super().__init__(reason)
        self.code: SkipCode = code
        self.reason = reason


def open_image(
    source: Path | IO[bytes], limits: IngestLimits, *, draft_to: int | None = None
) -> Image.Image:
    """Open and fully decode an untrusted image under the allowlist and the pixel cap.

    With `draft_to`, a JPEG is decoded at the smallest of 1/8, 1/4, 1/2 or full scale that
    still covers `draft_to` pixels a side (libjpeg scales while decoding, so a large photo
    costs a fraction of its full decode), and the pixel cap counts the pixels so decoded."""
    allowed = sorted(limits.allowed_formats)
    with warnings.catch_warnings():
        # Pillow only warns between 1x and 2x its MAX_IMAGE_PIXELS; a warning that is merely
        # logged would let the image through, so it must stop this file instead.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(source, formats=allowed)
            if img.format not in limits.allowed_formats:
                raise ImageRejectedError(
                    "format_not_allowed", f"{img.format} images are not accepted."
                )
            if draft_to is not None and img.format == "JPEG":
                img.draft(None, (draft_to, draft_to))
            width, height = img.size
            if width * height > limits.max_image_pixels:
                raise ImageRejectedError(
                    "too_many_pixels",
                    f"The image is {width}x{height}, over {limits.max_image_pixels} pixels.",
                )
            img.load()
            return img
        except ImageRejectedError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageRejectedError(
                "too_many_pixels", f"The image is too large to decode safely: {exc}"
            ) from None
        except UnidentifiedImageError:
            raise ImageRejectedError(*_unidentified(source, limits.allowed_formats)) from None
        # Broken files make Pillow's decoders raise many unrelated exception types; any of
        # them means this one file is unusable, never that the ingest should stop.
        except Exception as exc:
            raise ImageRejectedError(
                "corrupt_image", f"The image cannot be decoded: {exc}"
            ) from None


def _check_image(path: Path, limits: IngestLimits) -> tuple[SkipCode, str] | None:
    try:
        open_image(path, limits).close()
    except ImageRejectedError as exc:
        return exc.code, exc.reason
    return None


def _unidentified(source: Path | IO[bytes], allowed: frozenset[str]) -> tuple[SkipCode, str]:
    # Name the format from its magic bytes alone: opening it would parse a format we chose
    # not to expose to untrusted input.
    if isinstance(source, Path):
        with source.open("rb") as handle:
            prefix = handle.read(_PILLOW_PREFIX)
    else:
        source.seek(0)
        prefix = source.read(_PILLOW_PREFIX)
    if len(prefix) == _PILLOW_PREFIX:
        Image.init()
        for fmt, (_, accept) in Image.OPEN.items():
            # A str result is Pillow's "looks like it, but unsupported" hint, not a match.
            match = accept is not None and accept(prefix)
            if fmt not in allowed and match and not isinstance(match, str):
                return "format_not_allowed", f"{fmt} images are not accepted."
    return "not_an_image", "The file is not an image."


# --- Classes, split and result --------------------------------------------------------------


def _drop_small_classes(
    kept: list[_Job], dest: Path, minimum: int
) -> tuple[list[_Job], list[SkippedFile]]:
    counts = Counter(job.class_name for job in kept)
    small = {name for name, count in counts.items() if count < minimum}
    dropped: list[SkippedFile] = []
    for job in kept:
        if job.class_name in small:
            dest.joinpath(*job.target.split("/")).unlink()
            dropped.append(
                SkippedFile(
                    job.candidate.member.name,
                    "class_too_small",
                    f"Class {job.class_name!r} has fewer than {minimum} usable images.",
                )
            )
    remaining = sorted(name for name in counts if name not in small)
    if len(remaining) < 2:
        found = ", ".join(f"{name!r} ({counts[name]} images)" for name in sorted(counts))
        raise DatasetRejectedError(
            "too_few_classes",
            f"A dataset needs at least 2 classes with at least {minimum} usable images each; "
            f"found {found}.",
        )
    return [job for job in kept if job.class_name not in small], dropped


def _remove_empty_dirs(dest: Path) -> None:
    # Deepest first, so a folder emptied by removing its empty children goes too.
    for folder in sorted((p for p in dest.rglob("*") if p.is_dir()), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()


def _build_result(
    kept: list[_Job], skipped: list[SkippedFile], val_fraction: float, seed: int
) -> IngestResult:
    classes = sorted({job.class_name for job in kept})
    samples: list[Sample] = []
    class_counts: dict[str, dict[str, int]] = {}
    for label, name in enumerate(classes):
        paths = sorted(job.target for job in kept if job.class_name == name)
        val = pick_val(paths, val_fraction, seed)
        samples += [Sample(path, label, "val" if path in val else "train") for path in paths]
        class_counts[name] = {
            "train": len(paths) - len(val),
            "val": len(val),
            "total": len(paths),
        }
    return IngestResult(classes, samples, skipped, class_counts)


def check_image_formats(limits: IngestLimits) -> None:
    Image.init()
    unknown = sorted(limits.allowed_formats - set(Image.OPEN))
    if unknown or not limits.allowed_formats:
        raise ValueError(f"allowed_formats must be Pillow formats it can open; unknown: {unknown}")


# --- Shards: how an ingested image dataset is stored -----------------------------------------


def write_image_shards(root: Path, samples: Sequence[Sample], out: Path) -> list[TextShard]:
    """Pack the kept images (files under `root` at their sample paths) into uncompressed tar
    files in `out`, each about IMAGE_SHARD_BYTES, members named by sample path."""
    groups: list[list[Path]] = []
    packed = IMAGE_SHARD_BYTES
    for sample in samples:
        if packed >= IMAGE_SHARD_BYTES:
            groups.append([])
            packed = 0
        groups[-1].append(root.joinpath(*sample.path.split("/")))
        packed += groups[-1][-1].stat().st_size
    out.mkdir(parents=True, exist_ok=True)
    shards: list[TextShard] = []
    for members in groups:
        shard = TextShard(f"images-{len(shards):05d}.tar", len(members))
        with tarfile.open(out / shard.path, "w", format=tarfile.PAX_FORMAT) as archive:
            for member in members:
                archive.add(member, arcname=member.relative_to(root).as_posix(), recursive=False)
        shards.append(shard)
    return shards


def unpack_image_shards(
    shards: Sequence[TextShard],
    open_shard: Callable[[str], AbstractContextManager[IO[bytes]]],
    dest: Path,
) -> None:
    """Extract the shards, each streamed from `open_shard(shard.path)`, into the folder `dest`:
    the images land at their sample paths again."""
    dest.mkdir(parents=True, exist_ok=True)
    for shard in shards:
        with open_shard(shard.path) as stream, tarfile.open(fileobj=stream, mode="r|") as archive:
            archive.extractall(dest, filter="data")
