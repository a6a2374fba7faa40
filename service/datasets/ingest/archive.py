"""Hostile archives, read safely: members screened by name and type, streamed to disk under
byte caps. Image and text folder datasets both unpack through here."""

import contextlib
import lzma
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Literal

from service.datasets.ingest.results import DatasetRejectedError, SkipCode, SkippedFile

SUPPORTED_ARCHIVES = "zip, tar, tar.gz, tar.bz2 or tar.xz"
UNSAFE_PATH = "The path is absolute, climbs out with '..' or is not portable."

CHUNK = 2**20
_TarMode = Literal["r:", "r:gz", "r:bz2", "r:xz"]
_TAR_MODES: dict[str, _TarMode] = {"tar": "r:", "gz": "r:gz", "bz2": "r:bz2", "xz": "r:xz"}
_COMPRESSED_MAGIC = ((b"\x1f\x8b", "gz"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"))
# Formats we never unpack, recognised only so they are reported as nested archives.
_OTHER_ARCHIVE_MAGIC = (b"7z\xbc\xaf\x27\x1c", b"Rar!\x1a\x07", b"\x28\xb5\x2f\xfd")
_DRIVE = re.compile(r"^[A-Za-z]:")
_JUNK_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})
_MAX_NAME_CHARS = 1024


# --- Archive access -------------------------------------------------------------------------

MemberKind = Literal["file", "dir", "link", "special", "encrypted"]


@dataclass(frozen=True)
class Member:
    name: str
    kind: MemberKind
    opener: Callable[[], IO[bytes]]


class UnreadableMemberError(Exception):
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


def list_members(archive: Path, stack: contextlib.ExitStack, max_members: int) -> list[Member]:
    with archive.open("rb") as handle:
        fmt = archive_format(handle.read(512))
    if fmt is None:
        raise DatasetRejectedError(
            "unsupported_archive", f"The upload is not a supported archive ({SUPPORTED_ARCHIVES})."
        )
    if fmt == "zip":
        return _zip_members(archive, stack, max_members)
    return _tar_members(archive, fmt, stack, max_members)


def archive_format(head: bytes) -> str | None:
    # An empty zip has only the end-of-central-directory record, hence the second signature.
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    for magic, fmt in _COMPRESSED_MAGIC:
        if head.startswith(magic):
            return fmt
    if head[257:262] == b"ustar":
        return "tar"
    return None


def is_archive(head: bytes) -> bool:
    return archive_format(head) is not None or head.startswith(_OTHER_ARCHIVE_MAGIC)


def _check_member_count(count: int, max_members: int) -> None:
    if count > max_members:
        raise DatasetRejectedError(
            "too_many_members", f"The archive has more than {max_members} entries."
        )


def _zip_members(archive: Path, stack: contextlib.ExitStack, max_members: int) -> list[Member]:
    try:
        zf = stack.enter_context(zipfile.ZipFile(archive))
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise _corrupt_archive(exc) from exc
    infos = zf.infolist()
    _check_member_count(len(infos), max_members)
    return [Member(info.filename, _zip_kind(info), partial(zf.open, info)) for info in infos]


def _zip_kind(info: zipfile.ZipInfo) -> MemberKind:
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
) -> list[Member]:
    try:
        tf = stack.enter_context(tarfile.TarFile.open(archive, mode=_TAR_MODES[fmt]))
    except (EOFError, zlib.error, lzma.LZMAError) as exc:
        # Compressed data cut short or damaged inside the first header.
        raise _corrupt_archive(exc) from exc
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
        Member(info.name, _tar_kind(info), partial(_open_tar_member, tf, info)) for info in infos
    ]


def _tar_kind(info: tarfile.TarInfo) -> MemberKind:
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


def open_member(member: Member) -> IO[bytes]:
    try:
        return member.opener()
    except _MEMBER_READ_ERRORS as exc:
        raise UnreadableMemberError(str(exc)) from exc


def read_chunk(handle: IO[bytes]) -> bytes:
    try:
        return handle.read(CHUNK)
    except _MEMBER_READ_ERRORS as exc:
        raise UnreadableMemberError(str(exc)) from exc


# --- Screening names --------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    member: Member
    path: str  # normalised archive path


def screen(members: list[Member]) -> tuple[list[Candidate], list[SkippedFile]]:
    """Keep regular files with safe, visible, unique names; directories are implied by paths."""
    candidates: list[Candidate] = []
    skipped: list[SkippedFile] = []
    seen: set[str] = set()
    for member in members:
        if member.kind == "dir":
            continue
        if (path := normalise(member.name)) is None:
            skipped.append(SkippedFile(member.name, "unsafe_path", UNSAFE_PATH))
            continue
        problem = _screen_problem(member.kind, path, seen)
        if problem is not None:
            skipped.append(SkippedFile(member.name, *problem))
            continue
        seen.add(path)
        candidates.append(Candidate(member, path))
    return candidates, skipped


def _screen_problem(kind: MemberKind, path: str, seen: set[str]) -> tuple[SkipCode, str] | None:
    if kind == "link":
        return "link", "Symbolic and hard links are not extracted."
    if kind == "special":
        return "special_file", "Devices, pipes and other special files are not extracted."
    if kind == "encrypted":
        return "encrypted", "The file is password-protected."
    if is_hidden(path):
        return "hidden", "Hidden and system files are ignored."
    if path in seen:
        return "duplicate", "Another entry in the archive has the same path; the first one is kept."
    return None


def normalise(name: str) -> str | None:
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


def is_hidden(path: str) -> bool:
    return any(part.startswith(".") or part in _JUNK_NAMES for part in path.split("/"))


def is_valid_class_name(name: str) -> bool:
    return normalise(name) == name and "/" not in name and not is_hidden(name)


def wrapper_folder(paths: list[str]) -> str:
    """The single top-level folder that wraps the whole dataset, with its slash, or ''."""
    tops = {path.split("/", 1)[0] for path in paths}
    if len(tops) != 1 or any("/" not in path for path in paths):
        return ""
    prefix = tops.pop() + "/"
    inner = [path.removeprefix(prefix) for path in paths]
    # A lone folder of flat files is a single class, not a wrapper, unless it holds the CSV.
    if any("/" in path or is_csv(path) for path in inner):
        return prefix
    return ""


def is_csv(path: str) -> bool:
    return path.lower().endswith(".csv")


# --- Reading and writing members -------------------------------------------------------------


class MemberTooLargeError(UnreadableMemberError):
    pass


def read_small(member: Member, max_bytes: int) -> bytes:
    """The whole member, refused with MemberTooLargeError past `max_bytes`."""
    data = bytearray()
    with open_member(member) as handle:
        while chunk := read_chunk(handle):
            data += chunk
            if len(data) > max_bytes:
                raise MemberTooLargeError(f"it is larger than {max_bytes} bytes")
    return bytes(data)


@dataclass
class ByteBudget:
    limit: int
    used: int = 0

    def charge(self, size: int) -> None:
        self.used += size
        if self.used > self.limit:
            raise DatasetRejectedError(
                "too_large", f"The archive unpacks to more than {self.limit} bytes."
            )


def stream_to(
    member: Member, target: Path, max_bytes: int, budget: ByteBudget
) -> tuple[SkipCode, str] | None:
    """Copy `member` to a new file at `target`; on failure nothing is left at `target`."""
    try:
        with open_member(member) as source:
            head = read_chunk(source)
            if is_archive(head):
                return "nested_archive", "Archives inside the archive are not unpacked."
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                # "x" also refuses to follow anything already at target, including a symlink.
                output = target.open("xb")
            except (FileExistsError, NotADirectoryError):
                return "duplicate", "Another file in the archive has the same destination."
            with output:
                problem = _copy(head, source, output, max_bytes, budget)
    except UnreadableMemberError as exc:
        return "unreadable", f"The file cannot be read from the archive: {exc}"
    if problem is not None:
        target.unlink()
    return problem


def _copy(
    head: bytes, source: IO[bytes], output: IO[bytes], max_bytes: int, budget: ByteBudget
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
            chunk = read_chunk(source)
    except UnreadableMemberError as exc:
        return "unreadable", f"The file cannot be read from the archive: {exc}"
    return None


def prepare_dest(dest: Path) -> bool:
    """Make sure `dest` exists and is empty; return whether we created it."""
    if dest.exists():
        if not dest.is_dir() or any(dest.iterdir()):
            raise ValueError(f"{dest} must be an empty folder or not exist")
        return False
    dest.mkdir(parents=True)
    return True


def clear_dest(dest: Path, created: bool) -> None:
    if created:
        shutil.rmtree(dest, ignore_errors=True)
        return
    for child in dest.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
