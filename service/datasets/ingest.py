"""Turn an uploaded archive into a validated image-folder dataset.

The archive is treated as hostile: members are screened by name and type, streamed to disk
under byte caps, and every file that is kept has been fully decoded by Pillow. The result is
`dest/<class>/<file>` plus an `IngestResult` describing the classes, the split and every file
that was left out and why.
"""

import contextlib
import csv
import io
import logging
import lzma
import random
import re
import shutil
import stat
import tarfile
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any, Literal, cast, get_args

from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

Split = Literal["train", "val"]
SkipCode = Literal[
    "unsafe_path",
    "link",
    "special_file",
    "encrypted",
    "unreadable",
    "hidden",
    "duplicate",
    "unlabelled",
    "missing_file",
    "bad_label",
    "nested_archive",
    "too_large",
    "not_an_image",
    "format_not_allowed",
    "too_many_pixels",
    "corrupt_image",
    "class_too_small",
]
RejectCode = Literal[
    "unsupported_archive",
    "corrupt_archive",
    "too_many_members",
    "too_large",
    "bad_manifest",
    "no_images",
    "too_few_classes",
]

MANIFEST_VERSION = 1
SUPPORTED_ARCHIVES = "zip, tar, tar.gz, tar.bz2 or tar.xz"

_CHUNK = 2**20
_TarMode = Literal["r:", "r:gz", "r:bz2", "r:xz"]
_TAR_MODES: dict[str, _TarMode] = {"tar": "r:", "gz": "r:gz", "bz2": "r:bz2", "xz": "r:xz"}
_COMPRESSED_MAGIC = ((b"\x1f\x8b", "gz"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"))
# Formats we never unpack, recognised only so they are reported as nested archives.
_OTHER_ARCHIVE_MAGIC = (b"7z\xbc\xaf\x27\x1c", b"Rar!\x1a\x07", b"\x28\xb5\x2f\xfd")
_DRIVE = re.compile(r"^[A-Za-z]:")
_JUNK_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})
_PATH_COLUMNS = ("path", "filename", "image")
_MAX_NAME_CHARS = 1024
_MISSING_FILE = "The CSV lists a file that is not among the archive's usable files."
_DUPLICATE_ROW = "The CSV lists this path more than once; the first row is kept."
_UNSAFE_PATH = "The path is absolute, climbs out with '..' or is not portable."
# Pillow reads this many bytes to pick a plugin; we reuse it to name formats it won't open.
_PILLOW_PREFIX = 16


@dataclass(frozen=True)
class IngestLimits:
    max_members: int = 100_000
    max_member_bytes: int = 50 * 2**20
    # Counted from bytes actually written, so a zip bomb cannot lie its way past it.
    max_total_bytes: int = 5 * 2**30
    # Checked against the image header before any pixel is decoded.
    max_image_pixels: int = 40_000_000
    allowed_formats: frozenset[str] = frozenset({"JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF"})
    min_images_per_class: int = 2


@dataclass(frozen=True)
class SkippedFile:
    path: str  # as written in the archive (or in the CSV manifest)
    code: SkipCode
    reason: str


@dataclass(frozen=True)
class Sample:
    path: str  # relative to dest, posix separators
    label: int
    split: Split


@dataclass(frozen=True)
class IngestResult:
    classes: list[str]
    samples: list[Sample]
    skipped: list[SkippedFile]
    class_counts: dict[str, dict[str, int]]

    def to_manifest(self) -> dict[str, Any]:
        return {
            "version": MANIFEST_VERSION,
            "classes": list(self.classes),
            "samples": [{"path": s.path, "label": s.label, "split": s.split} for s in self.samples],
            "skipped": [{"path": s.path, "code": s.code, "reason": s.reason} for s in self.skipped],
            "class_counts": {name: dict(counts) for name, counts in self.class_counts.items()},
        }

    @classmethod
    def from_manifest(cls, data: dict[str, Any]) -> "IngestResult":
        if data.get("version") != MANIFEST_VERSION:
            raise ValueError(f"unsupported manifest version {data.get('version')!r}")
        return cls(
            classes=[str(name) for name in data["classes"]],
            samples=[
                Sample(path=str(s["path"]), label=int(s["label"]), split=_parse_split(s["split"]))
                for s in data["samples"]
            ],
            skipped=[
                SkippedFile(
                    path=str(s["path"]), code=_parse_skip_code(s["code"]), reason=str(s["reason"])
                )
                for s in data["skipped"]
            ],
            class_counts={
                str(name): {str(k): int(v) for k, v in counts.items()}
                for name, counts in data["class_counts"].items()
            },
        )


class DatasetRejectedError(Exception):
    """The archive as a whole cannot become a dataset; `message` is meant for the uploader."""

    def __init__(self, code: RejectCode, message: str) -> None:
        super().__init__(message)
        self.code: RejectCode = code
        self.message = message

    # The worker may pickle this across processes; the default reduce would drop `code`.
    def __reduce__(self) -> tuple[type["DatasetRejectedError"], tuple[RejectCode, str]]:
        return type(self), (self.code, self.message)


def ingest_archive(
    archive: Path,
    dest: Path,
    *,
    limits: IngestLimits = IngestLimits(),
    val_fraction: float = 0.2,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> IngestResult:
    """Extract `archive` into `dest` (missing or empty) as `dest/<class>/<file>` and split it.

    Raises DatasetRejectedError when the archive as a whole is unusable; `dest` is then left
    without any of the archive's content, as it is after any other exception.
    """
    _check_arguments(limits, val_fraction)
    created = _prepare_dest(dest)
    try:
        with contextlib.ExitStack() as stack:
            members = _list_members(archive, stack, limits.max_members)
            result = _ingest_members(members, dest.resolve(), limits, val_fraction, seed, progress)
    except BaseException as exc:
        _clear_dest(dest, created)
        if isinstance(exc, DatasetRejectedError):
            logger.info("rejected %s (%s): %s", archive, exc.code, exc.message)
        raise
    logger.info(
        "ingested %s: %d classes, %d images, %d files skipped",
        archive,
        len(result.classes),
        len(result.samples),
        len(result.skipped),
    )
    return result


# --- Archive access -------------------------------------------------------------------------

_Kind = Literal["file", "dir", "link", "special", "encrypted"]


@dataclass(frozen=True)
class _Member:
    name: str
    kind: _Kind
    opener: Callable[[], IO[bytes]]


class _UnreadableMemberError(Exception):
    pass


# Reading one member can fail in many unrelated ways: bad CRCs, truncated streams, broken
# compressed data (bz2 and gzip report that as OSError), encryption (RuntimeError) and
# compression methods zipfile lacks. Only archive reads go through these handlers, so OSError
# here never hides a failure to write to dest.
_MEMBER_READ_ERRORS = (
    zipfile.BadZipFile,
    tarfile.TarError,
    EOFError,
    OSError,
    zlib.error,
    lzma.LZMAError,
    RuntimeError,
    NotImplementedError,
)


def _list_members(archive: Path, stack: contextlib.ExitStack, max_members: int) -> list[_Member]:
    with archive.open("rb") as handle:
        fmt = _archive_format(handle.read(512))
    if fmt is None:
        raise DatasetRejectedError(
            "unsupported_archive", f"The upload is not a supported archive ({SUPPORTED_ARCHIVES})."
        )
    if fmt == "zip":
        return _zip_members(archive, stack, max_members)
    return _tar_members(archive, fmt, stack, max_members)


def _archive_format(head: bytes) -> str | None:
    # An empty zip has only the end-of-central-directory record, hence the second signature.
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    for magic, fmt in _COMPRESSED_MAGIC:
        if head.startswith(magic):
            return fmt
    if head[257:262] == b"ustar":
        return "tar"
    return None


def _is_archive(head: bytes) -> bool:
    return _archive_format(head) is not None or head.startswith(_OTHER_ARCHIVE_MAGIC)


def _check_member_count(count: int, max_members: int) -> None:
    if count > max_members:
        raise DatasetRejectedError(
            "too_many_members", f"The archive has more than {max_members} entries."
        )


def _zip_members(archive: Path, stack: contextlib.ExitStack, max_members: int) -> list[_Member]:
    try:
        zf = stack.enter_context(zipfile.ZipFile(archive))
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise _corrupt_archive(exc) from exc
    infos = zf.infolist()
    _check_member_count(len(infos), max_members)
    return [_Member(info.filename, _zip_kind(info), partial(zf.open, info)) for info in infos]


def _zip_kind(info: zipfile.ZipInfo) -> _Kind:
    # Unix zips keep st_mode in the high half of external_attr; that is where symlinks hide.
    mode = info.external_attr >> 16
    if info.is_dir() or stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "link"
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
        return "special"
    if info.flag_bits & 0x1:
        return "encrypted"
    return "file"


def _tar_members(
    archive: Path, fmt: str, stack: contextlib.ExitStack, max_members: int
) -> list[_Member]:
    try:
        tf = stack.enter_context(tarfile.TarFile.open(archive, mode=_TAR_MODES[fmt]))
    except tarfile.TarError as exc:
        raise DatasetRejectedError(
            "unsupported_archive",
            f"The {fmt} file does not hold a tar archive ({SUPPORTED_ARCHIVES}).",
        ) from exc
    infos: list[tarfile.TarInfo] = []
    try:
        # Counting means reading every header, so stop as soon as the cap is passed.
        while (info := tf.next()) is not None:
            infos.append(info)
            _check_member_count(len(infos), max_members)
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
        raise _corrupt_archive(exc) from exc
    return [
        _Member(info.name, _tar_kind(info), partial(_open_tar_member, tf, info)) for info in infos
    ]


def _tar_kind(info: tarfile.TarInfo) -> _Kind:
    if info.isdir():
        return "dir"
    if info.issym() or info.islnk():
        return "link"
    if info.isreg():
        return "file"
    return "special"


def _open_tar_member(tf: tarfile.TarFile, info: tarfile.TarInfo) -> IO[bytes]:
    handle = tf.extractfile(info)
    if handle is None:
        raise tarfile.ReadError(f"{info.name} has no data")
    return handle


def _corrupt_archive(exc: Exception) -> DatasetRejectedError:
    return DatasetRejectedError("corrupt_archive", f"The archive is damaged: {exc}")


def _open_member(member: _Member) -> IO[bytes]:
    try:
        return member.opener()
    except _MEMBER_READ_ERRORS as exc:
        raise _UnreadableMemberError(str(exc)) from exc


def _read_chunk(handle: IO[bytes]) -> bytes:
    try:
        return handle.read(_CHUNK)
    except _MEMBER_READ_ERRORS as exc:
        raise _UnreadableMemberError(str(exc)) from exc


# --- Screening names --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Candidate:
    member: _Member
    path: str  # normalised archive path


def _screen(members: list[_Member]) -> tuple[list[_Candidate], list[SkippedFile]]:
    """Keep regular files with safe, visible, unique names; directories are implied by paths."""
    candidates: list[_Candidate] = []
    skipped: list[SkippedFile] = []
    seen: set[str] = set()
    for member in members:
        if member.kind == "dir":
            continue
        if (path := _normalise(member.name)) is None:
            skipped.append(SkippedFile(member.name, "unsafe_path", _UNSAFE_PATH))
            continue
        problem = _screen_problem(member.kind, path, seen)
        if problem is not None:
            skipped.append(SkippedFile(member.name, *problem))
            continue
        seen.add(path)
        candidates.append(_Candidate(member, path))
    return candidates, skipped


def _screen_problem(kind: _Kind, path: str, seen: set[str]) -> tuple[SkipCode, str] | None:
    if kind == "link":
        return "link", "Symbolic and hard links are not extracted."
    if kind == "special":
        return "special_file", "Devices, pipes and other special files are not extracted."
    if kind == "encrypted":
        return "encrypted", "The file is password-protected."
    if _is_hidden(path):
        return "hidden", "Hidden and system files are ignored."
    if path in seen:
        return "duplicate", "Another entry in the archive has the same path; the first one is kept."
    return None


def _normalise(name: str) -> str | None:
    """Return `name` as a clean relative posix path, or None if it is unsafe anywhere."""
    if (
        not name
        or len(name) > _MAX_NAME_CHARS
        or name.startswith("/")
        or "\\" in name
        or _DRIVE.match(name)
        or any(_is_unprintable(ch) for ch in name)
    ):
        return None
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if not parts or ".." in parts or any(len(part.encode()) > 255 for part in parts):
        return None
    return "/".join(parts)


def _is_unprintable(ch: str) -> bool:
    # Surrogates come from undecodable tar names; they cannot be stored as UTF-8 later.
    return ch < " " or ch == "\x7f" or "\ud800" <= ch <= "\udfff"


def _is_hidden(path: str) -> bool:
    return any(part.startswith(".") or part in _JUNK_NAMES for part in path.split("/"))


def _is_valid_class_name(name: str) -> bool:
    return _normalise(name) == name and "/" not in name and not _is_hidden(name)


# --- Layout: which class each file belongs to -----------------------------------------------


@dataclass(frozen=True)
class _Job:
    candidate: _Candidate
    class_name: str
    target: str  # relative to dest, posix


def _plan(
    candidates: list[_Candidate], limits: IngestLimits
) -> tuple[list[_Job], list[SkippedFile]]:
    """Assign every candidate a class and a target path, from folders or a CSV manifest."""
    wrapper = _wrapper(candidates)
    inner = {c.path: c.path.removeprefix(wrapper) for c in candidates}
    manifest = _find_manifest([c for c in candidates if "/" not in inner[c.path]])
    if manifest is None:
        return _plan_folders(candidates, inner)
    names = {c.path for c in candidates}
    labels, skipped = _read_manifest(manifest, wrapper, names, limits.max_member_bytes)
    jobs, unlabelled = _plan_from_labels([c for c in candidates if c is not manifest], labels)
    return jobs, skipped + unlabelled


def _wrapper(candidates: list[_Candidate]) -> str:
    """The single top-level folder that wraps the whole dataset, with its slash, or ''."""
    paths = [c.path for c in candidates]
    tops = {path.split("/", 1)[0] for path in paths}
    if len(tops) != 1 or any("/" not in path for path in paths):
        return ""
    prefix = tops.pop() + "/"
    inner = [path.removeprefix(prefix) for path in paths]
    # A lone folder of flat files is a single class, not a wrapper, unless it holds the CSV.
    if any("/" in path or _is_csv(path) for path in inner):
        return prefix
    return ""


def _is_csv(path: str) -> bool:
    return path.lower().endswith(".csv")


def _find_manifest(root_files: list[_Candidate]) -> _Candidate | None:
    csvs = [c for c in root_files if _is_csv(c.path)]
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
    candidates: list[_Candidate], inner: dict[str, str]
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
    manifest: _Candidate, wrapper: str, names: set[str], max_bytes: int
) -> tuple[dict[str, str], list[SkippedFile]]:
    """Map archive paths to labels; rows that cannot be used are reported."""
    labels: dict[str, str] = {}
    skipped: list[SkippedFile] = []
    for raw_path, label in _manifest_rows(manifest, max_bytes):
        key = _manifest_key(raw_path, wrapper, names)
        if key is None:
            skipped.append(SkippedFile(raw_path, "missing_file", _MISSING_FILE))
        elif not _is_valid_class_name(label):
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
    path = _normalise(raw_path.replace("\\", "/"))
    if path is None:
        return None
    return next((key for key in (wrapper + path, path) if key in names), None)


def _manifest_rows(manifest: _Candidate, max_bytes: int) -> list[tuple[str, str]]:
    name = manifest.member.name
    try:
        text = _read_small(manifest.member, max_bytes).decode("utf-8-sig")
        rows = [row for row in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in row)]
    except (UnicodeDecodeError, csv.Error, _UnreadableMemberError) as exc:
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


def _read_small(member: _Member, max_bytes: int) -> bytes:
    data = bytearray()
    with _open_member(member) as handle:
        while chunk := _read_chunk(handle):
            data += chunk
            if len(data) > max_bytes:
                raise _UnreadableMemberError(f"it is larger than {max_bytes} bytes")
    return bytes(data)


def _plan_from_labels(
    candidates: list[_Candidate], labels: dict[str, str]
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


@dataclass
class _ByteBudget:
    limit: int
    used: int = 0

    def charge(self, size: int) -> None:
        self.used += size
        if self.used > self.limit:
            raise DatasetRejectedError(
                "too_large", f"The archive unpacks to more than {self.limit} bytes."
            )


@dataclass
class _Progress:
    callback: Callable[[int, int], None] | None
    total: int
    reported: int = -1

    def update(self, done: int) -> None:
        # Roughly one call per percent: the callback may write to a database.
        step = max(1, self.total // 100)
        if self.callback is not None and (done == self.total or done - self.reported >= step):
            self.reported = done
            self.callback(done, self.total)


def _ingest_members(
    members: list[_Member],
    dest: Path,
    limits: IngestLimits,
    val_fraction: float,
    seed: int,
    progress: Callable[[int, int], None] | None,
) -> IngestResult:
    candidates, skipped = _screen(members)
    jobs, plan_skipped = _plan(candidates, limits)
    skipped += plan_skipped
    reporter = _Progress(progress, len(members))
    done = len(members) - len(jobs)
    reporter.update(done)
    budget = _ByteBudget(limits.max_total_bytes)
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
        raise DatasetRejectedError("no_images", f"No usable images were found. {_summary(skipped)}")
    kept, dropped = _drop_small_classes(kept, dest, limits.min_images_per_class)
    _remove_empty_dirs(dest)
    return _build_result(kept, skipped + dropped, val_fraction, seed)


def _extract(
    job: _Job, dest: Path, limits: IngestLimits, budget: _ByteBudget
) -> tuple[SkipCode, str] | None:
    target = dest.joinpath(*job.target.split("/"))
    if not target.resolve().is_relative_to(dest):
        return "unsafe_path", "The file would land outside the dataset folder."
    problem = _stream_to(job.candidate.member, target, limits.max_member_bytes, budget)
    if problem is None:
        problem = _check_image(target, limits)
    if problem is not None:
        target.unlink(missing_ok=True)
    return problem


def _stream_to(
    member: _Member, target: Path, max_bytes: int, budget: _ByteBudget
) -> tuple[SkipCode, str] | None:
    """Copy `member` to a new file at `target`; on failure nothing is left at `target`."""
    try:
        with _open_member(member) as source:
            head = _read_chunk(source)
            if _is_archive(head):
                return "nested_archive", "Archives inside the archive are not unpacked."
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                # "x" also refuses to follow anything already at target, including a symlink.
                output = target.open("xb")
            except (FileExistsError, NotADirectoryError):
                return "duplicate", "Another file in the archive has the same destination."
            with output:
                problem = _copy(head, source, output, max_bytes, budget)
    except _UnreadableMemberError as exc:
        return "unreadable", f"The file cannot be read from the archive: {exc}"
    if problem is not None:
        target.unlink()
    return problem


def _copy(
    head: bytes, source: IO[bytes], output: IO[bytes], max_bytes: int, budget: _ByteBudget
) -> tuple[SkipCode, str] | None:
    # Declared sizes are never trusted: the caps apply to the bytes that actually arrive.
    chunk, written = head, 0
    try:
        while chunk:
            written += len(chunk)
            if written > max_bytes:
                return "too_large", f"The file is larger than {max_bytes} bytes."
            budget.charge(len(chunk))
            output.write(chunk)
            chunk = _read_chunk(source)
    except _UnreadableMemberError as exc:
        return "unreadable", f"The file cannot be read from the archive: {exc}"
    return None


class ImageRejectedError(Exception):
    """One image is unusable; `code` is a skip code and the message says why."""

    def __init__(self, code: SkipCode, reason: str) -> None:
        super().__init__(reason)
        self.code: SkipCode = code
        self.reason = reason


def open_image(source: Path | IO[bytes], limits: IngestLimits) -> Image.Image:
    """Open and fully decode an untrusted image under the allowlist and the pixel cap."""
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


def _summary(skipped: list[SkippedFile]) -> str:
    if not skipped:
        return "The archive holds no files."
    counts = Counter(s.code for s in skipped)
    return "Skipped files: " + ", ".join(f"{code} {n}" for code, n in sorted(counts.items())) + "."


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
        val = _pick_val(paths, val_fraction, seed)
        samples += [Sample(path, label, "val" if path in val else "train") for path in paths]
        class_counts[name] = {
            "train": len(paths) - len(val),
            "val": len(val),
            "total": len(paths),
        }
    return IngestResult(classes, samples, skipped, class_counts)


def _pick_val(paths: list[str], val_fraction: float, seed: int) -> set[str]:
    # A fresh generator per class keeps each class's split independent of the other classes.
    shuffled = list(paths)
    random.Random(seed).shuffle(shuffled)
    n = len(shuffled)
    count = min(n - 1, max(1, round(n * val_fraction))) if n >= 2 else 0
    return set(shuffled[:count])


# --- Arguments and destination --------------------------------------------------------------


def _check_arguments(limits: IngestLimits, val_fraction: float) -> None:
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    sizes = (
        limits.max_members,
        limits.max_member_bytes,
        limits.max_total_bytes,
        limits.max_image_pixels,
        limits.min_images_per_class,
    )
    if min(sizes) < 1:
        raise ValueError(f"every limit must be positive: {limits}")
    Image.init()
    unknown = sorted(limits.allowed_formats - set(Image.OPEN))
    if unknown or not limits.allowed_formats:
        raise ValueError(f"allowed_formats must be Pillow formats it can open; unknown: {unknown}")


def _prepare_dest(dest: Path) -> bool:
    """Make sure `dest` exists and is empty; return whether we created it."""
    if dest.exists():
        if not dest.is_dir() or any(dest.iterdir()):
            raise ValueError(f"{dest} must be an empty folder or not exist")
        return False
    dest.mkdir(parents=True)
    return True


def _clear_dest(dest: Path, created: bool) -> None:
    if created:
        shutil.rmtree(dest, ignore_errors=True)
        return
    for child in dest.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _parse_split(value: object) -> Split:
    if value not in get_args(Split):
        raise ValueError(f"unknown split {value!r}")
    return cast(Split, value)


def _parse_skip_code(value: object) -> SkipCode:
    if value not in get_args(SkipCode):
        raise ValueError(f"unknown skip code {value!r}")
    return cast(SkipCode, value)
