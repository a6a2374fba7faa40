"""Text datasets: rows from a CSV with a header, JSON Lines, or an archive of one folder of .txt
files per class, checked row by row and stored as a few JSON Lines shards.

Uploads are streamed line by line and never held whole in memory: a physical line is read up
to a cap, so one enormous line costs at most the cap. Bytes that are not UTF-8 make their row a
skip (with its line number), never the whole upload. Kept rows go to a staging file first,
because a text that turns up later under another label disqualifies its earlier row too; only
per-row digests and row numbers stay in memory.
"""

import codecs
import csv
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import IO, Any, Literal

from service.datasets.ingest.archive import (
    CHUNK,
    ByteBudget,
    Candidate,
    MemberTooLargeError,
    UnreadableMemberError,
    read_small,
    wrapper_folder,
)
from service.datasets.ingest.results import (
    DatasetRejectedError,
    IngestLimits,
    IngestResult,
    Progress,
    SkipCode,
    SkippedFile,
    Split,
    TextShard,
    parse_split,
    pick_val,
    summary,
)

logger = logging.getLogger(__name__)

TextFormat = Literal["csv", "jsonl"]
SUPPORTED_TEXT = (
    "a CSV file with a header row, JSON Lines, or a zip/tar archive of one folder of .txt "
    "files per class"
)
SHARD_ROWS = 50_000
MAX_LABEL_CHARS = 200
_STAGING = ".staging.jsonl"
_BOM = codecs.BOM_UTF8
# A physical line may hold the text, the label and other columns; past this many times the
# field cap the row is reported as too large without reading the rest of the line.
_LINE_CAP_FIELDS = 4


class MissingColumnError(DatasetRejectedError):
    """The CSV header lacks a column; `param` is the form field that names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__("bad_header", message)
        self.param = param

    def __reduce__(self) -> tuple[type["MissingColumnError"], tuple[str, str]]:  # type: ignore[override]
        return type(self), (self.param, self.message)


@dataclass(frozen=True)
class TextColumns:
    text: str = "text"
    label: str = "label"


@dataclass(frozen=True)
class RawRow:
    """One row as read, before it is checked; `problem` is set when reading already failed."""

    text: str
    label: str | None
    line: int | None = None
    path: str | None = None
    problem: tuple[SkipCode, str] | None = None

    @classmethod
    def rejected(cls, line: int, code: SkipCode, reason: str) -> "RawRow":
        """A row that reading already failed: it is skipped by its problem, its text unread."""
        return cls("", None, line, problem=(code, reason))

    def skip(self, code: SkipCode, reason: str) -> SkippedFile:
        return SkippedFile(self.path, code, reason, self.line)

    @property
    def where(self) -> str:
        return f"line {self.line}" if self.line is not None else str(self.path)


@dataclass(frozen=True)
class TextRow:
    text: str
    label: int | None  # None: an unlabelled text
    split: Split | None  # None for unlabelled texts


# --- Reading uploads --------------------------------------------------------------------------


def sniff_text_format(head: bytes) -> TextFormat | None:
    """What a file that starts with `head` holds, judged by its content, or None."""
    text = head.removeprefix(_BOM).lstrip()
    if not text or b"\x00" in text:
        return None
    if text.startswith(b"{"):
        return "jsonl"
    first = _first_record(text)
    return "csv" if first is not None and len(first) >= 2 else None


def check_csv_header(head: bytes, columns: TextColumns) -> None:
    """Raise DatasetRejectedError("bad_header") unless the CSV's header names both columns."""
    header = _first_record(head.removeprefix(_BOM)) or []
    _column_indexes(header, columns)


def _first_record(data: bytes) -> list[str] | None:
    lines = data.decode("utf-8", errors="surrogateescape").splitlines(keepends=True)
    try:
        return next((row for row in csv.reader(lines) if row), None)
    except csv.Error:
        return None


def _column_indexes(header: list[str], columns: TextColumns) -> tuple[int, int]:
    names = [cell.strip() for cell in header]

    def find(wanted: str, param: str) -> int:
        for candidates in (names, [name.lower() for name in names]):
            key = wanted if candidates is names else wanted.lower()
            if key in candidates:
                return candidates.index(key)
        shown = ", ".join(repr(name) for name in names) or "nothing"
        raise MissingColumnError(
            param,
            f"The CSV's header has no column {wanted!r} (found {shown}); name the column that "
            f"holds the {param.removesuffix('_column')} with the {param} form field.",
        )

    return find(columns.text, "text_column"), find(columns.label, "label_column")


def _physical_lines(
    handle: IO[bytes], line_cap: int, oversized: set[int], on_bytes: Callable[[int], None]
) -> Iterator[str]:
    """Lines decoded as UTF-8 with undecodable bytes kept as surrogates (to be found per row).

    A line longer than `line_cap` bytes is cut there (the rest is read and dropped) and its
    number added to `oversized`.
    """
    for number in count(1):
        raw = handle.readline(line_cap + 1)
        if not raw:
            return
        read = len(raw)
        if len(raw) > line_cap and not raw.endswith(b"\n"):
            oversized.add(number)
            while (rest := handle.readline(CHUNK)) and not rest.endswith(b"\n"):
                read += len(rest)
            read += len(rest)
            raw = raw[:line_cap] + b"\n"
        if number == 1:
            raw = raw.removeprefix(_BOM)
        on_bytes(read)
        yield raw.decode("utf-8", errors="surrogateescape")


def _has_bad_bytes(*values: str | None) -> bool:
    # Bytes that are not UTF-8 decode to surrogates U+DC80..U+DCFF (surrogateescape); a JSON
    # escape can name any surrogate (U+D800..U+DFFF), which no UTF-8 file can hold either.
    return any(
        value is not None and any("\ud800" <= ch <= "\udfff" for ch in value) for value in values
    )


_BAD_BYTES = "The row holds bytes that are not UTF-8 text."


def read_csv_rows(
    handle: IO[bytes], columns: TextColumns, line_cap: int, on_bytes: Callable[[int], None]
) -> Iterator[RawRow]:
    oversized: set[int] = set()
    lines = _physical_lines(handle, line_cap, oversized, on_bytes)
    reader = csv.reader(lines)
    indexes: tuple[int, int] | None = None
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            yield RawRow.rejected(start, "bad_row", f"The row is not valid CSV: {exc}")
            continue
        if not row or not any(cell.strip() for cell in row):
            continue
        if indexes is None:
            indexes = _column_indexes(row, columns)
            continue
        if any(start <= number <= reader.line_num for number in oversized):
            yield RawRow.rejected(start, "too_large", f"The row is over {line_cap} bytes.")
            continue
        text_index, label_index = indexes
        text = row[text_index] if text_index < len(row) else ""
        label = row[label_index] if label_index < len(row) else None
        if _has_bad_bytes(*row):
            yield RawRow.rejected(start, "bad_encoding", _BAD_BYTES)
            continue
        yield RawRow(text, label, start)
    if indexes is None:
        raise DatasetRejectedError("bad_header", "The CSV has no header row and no rows.")


def read_jsonl_rows(
    handle: IO[bytes], columns: TextColumns, line_cap: int, on_bytes: Callable[[int], None]
) -> Iterator[RawRow]:
    oversized: set[int] = set()
    for number, line in enumerate(_physical_lines(handle, line_cap, oversized, on_bytes), 1):
        if not line.strip():
            continue
        if number in oversized:
            yield RawRow.rejected(number, "too_large", f"The line is over {line_cap} bytes.")
            continue
        if _has_bad_bytes(line):
            yield RawRow.rejected(number, "bad_encoding", _BAD_BYTES)
            continue
        yield _json_row(line, number, columns)


def _json_row(line: str, number: int, columns: TextColumns) -> RawRow:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        return RawRow.rejected(number, "bad_row", f"The line is not valid JSON: {exc}")
    if not isinstance(value, dict):
        return RawRow.rejected(number, "bad_row", "The line is not a JSON object.")
    text, label = value.get(columns.text, ""), value.get(columns.label)
    if not isinstance(text, str):
        reason = f"{columns.text!r} must be a string, not {type(text).__name__}."
        return RawRow.rejected(number, "bad_row", reason)
    # Numeric labels (0/1 sentiment, star ratings) are common; they become class names.
    if isinstance(label, int) and not isinstance(label, bool):
        label = str(label)
    if label is not None and not isinstance(label, str):
        reason = f"{columns.label!r} must be a string or an integer, not {type(label).__name__}."
        return RawRow.rejected(number, "bad_row", reason)
    if _has_bad_bytes(text, label):
        # A JSON escape for a lone surrogate is no text either.
        return RawRow.rejected(number, "bad_encoding", _BAD_BYTES)
    return RawRow(text, label, number)


def read_folder_rows(
    candidates: list[Candidate],
    limits: IngestLimits,
    skipped: list[SkippedFile],
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[RawRow]:
    """One row per .txt file in a class folder; files that cannot be rows go to `skipped`."""
    wrapper = wrapper_folder([c.path for c in candidates])
    budget = ByteBudget(limits.max_total_bytes)
    reporter = Progress(progress, max(1, len(candidates)))
    for done, candidate in enumerate(candidates, 1):
        reporter.update(done)
        name, inner = candidate.member.name, candidate.path.removeprefix(wrapper)
        if "/" not in inner:
            skipped.append(SkippedFile(name, "unlabelled", "The file is not in a class folder."))
            continue
        if not inner.lower().endswith(".txt"):
            skipped.append(SkippedFile(name, "not_text", "Only .txt files are read as texts."))
            continue
        try:
            data = read_small(candidate.member, limits.max_text_field_bytes)
        except MemberTooLargeError:
            cap = limits.max_text_field_bytes
            skipped.append(SkippedFile(name, "too_large", f"The file is over {cap} bytes."))
            continue
        except UnreadableMemberError as exc:
            reason = f"The file cannot be read from the archive: {exc}"
            skipped.append(SkippedFile(name, "unreadable", reason))
            continue
        budget.charge(len(data))
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            reason = f"The file is not UTF-8 text: {exc}"
            skipped.append(SkippedFile(name, "bad_encoding", reason))
            continue
        yield RawRow(text, inner.partition("/")[0], path=name)


# --- Checking rows and writing shards -------------------------------------------------------


@dataclass
class _FirstSeen:
    row: RawRow
    label: str
    ordinal: int


@dataclass
class _Staged:
    """What pass 1 keeps in memory: row numbers and digests, never the texts."""

    by_class: dict[str, list[int]]
    dropped: set[int]
    unlabelled: int
    rows: int


def build_text_dataset(
    rows: Iterable[RawRow],
    dest: Path,
    *,
    limits: IngestLimits,
    val_fraction: float,
    seed: int,
    keep_unlabelled: bool,
    skipped: list[SkippedFile],
) -> IngestResult:
    """Check `rows`, split the labelled ones per class and write the shards into `dest`."""
    staging = dest / _STAGING
    with staging.open("w", encoding="utf-8") as out:
        staged = _stage(rows, out, limits, keep_unlabelled, skipped)
    try:
        classes, by_class = _drop_small_classes(staged, limits.min_images_per_class, skipped)
        val = {n for ordinals in by_class.values() for n in pick_val(ordinals, val_fraction, seed)}
        shards = _write_shards(staging, dest, staged.dropped, classes, val)
    finally:
        staging.unlink()
    class_counts = {
        name: {
            "train": len(by_class[name]) - sum(1 for n in by_class[name] if n in val),
            "val": sum(1 for n in by_class[name] if n in val),
            "total": len(by_class[name]),
        }
        for name in classes
    }
    return IngestResult(
        classes=classes,
        samples=[],
        skipped=skipped,
        class_counts=class_counts,
        modality="text",
        shards=shards,
        unlabelled=staged.unlabelled,
    )


def _stage(
    rows: Iterable[RawRow],
    out: IO[str],
    limits: IngestLimits,
    keep_unlabelled: bool,
    skipped: list[SkippedFile],
) -> _Staged:
    labelled: dict[bytes, _FirstSeen] = {}
    conflicting: set[bytes] = set()
    unlabelled_seen: set[bytes] = set()
    staged = _Staged(by_class={}, dropped=set(), unlabelled=0, rows=0)
    for row in rows:
        problem = row.problem or _row_problem(row, limits, keep_unlabelled)
        if problem is not None:
            skipped.append(row.skip(*problem))
            continue
        text = row.text.strip()
        label = (row.label or "").strip() or None
        digest = _digest(text)
        if label is None:
            if digest in unlabelled_seen:
                skipped.append(row.skip("duplicate", "The same unlabelled text came earlier."))
                continue
            unlabelled_seen.add(digest)
            staged.unlabelled += 1
        elif (first := labelled.get(digest)) is not None:
            if digest in conflicting or first.label != label:
                if digest not in conflicting:
                    conflicting.add(digest)
                    staged.dropped.add(first.ordinal)
                    skipped.append(_conflict(first, row, label))
                reason = (
                    f"The same text is at {first.row.where} under label {first.label!r}; "
                    "rows that disagree are all skipped."
                )
                skipped.append(row.skip("conflicting_labels", reason))
            else:
                reason = f"The same text and label are at {first.row.where}; the first is kept."
                skipped.append(row.skip("duplicate", reason))
            continue
        else:
            labelled[digest] = _FirstSeen(row, label, staged.rows)
            staged.by_class.setdefault(label, []).append(staged.rows)
        out.write(json.dumps({"text": text, "label": label, "line": row.line, "path": row.path}))
        out.write("\n")
        staged.rows += 1
    return staged


def _conflict(first: _FirstSeen, row: RawRow, label: str) -> SkippedFile:
    reason = (
        f"The same text is at {row.where} under label {label!r}; rows that disagree are all "
        "skipped."
    )
    return first.row.skip("conflicting_labels", reason)


def _row_problem(
    row: RawRow, limits: IngestLimits, keep_unlabelled: bool
) -> tuple[SkipCode, str] | None:
    cap = limits.max_text_field_bytes
    if not row.text.strip():
        return "empty_text", "The text is empty."
    if len(row.text.encode("utf-8")) > cap:
        return "too_large", f"The text is over {cap} bytes."
    label = (row.label or "").strip()
    if not label:
        if keep_unlabelled:
            return None
        return "missing_label", "The row has no label."
    if len(label) > MAX_LABEL_CHARS:
        return "bad_label", f"The label is over {MAX_LABEL_CHARS} characters."
    return None


def _digest(text: str) -> bytes:
    # Whitespace differences do not make two texts different examples.
    return hashlib.blake2b(" ".join(text.split()).encode("utf-8"), digest_size=16).digest()


def _drop_small_classes(
    staged: _Staged, minimum: int, skipped: list[SkippedFile]
) -> tuple[list[str], dict[str, list[int]]]:
    by_class = {
        name: [n for n in ordinals if n not in staged.dropped]
        for name, ordinals in staged.by_class.items()
    }
    if not any(by_class.values()):
        raise DatasetRejectedError(
            "no_texts", f"No usable labelled texts were found. {summary(skipped, what='rows')}"
        )
    small = {name for name, ordinals in by_class.items() if len(ordinals) < minimum}
    for name in sorted(small):
        staged.dropped.update(by_class[name])
        skipped.append(
            SkippedFile(
                None,
                "class_too_small",
                f"Class {name!r} has {len(by_class[name])} usable texts, fewer than {minimum}; "
                "its rows are left out.",
            )
        )
    classes = sorted(name for name, ordinals in by_class.items() if ordinals and name not in small)
    if len(classes) < 2:
        found = ", ".join(f"{name!r} ({len(by_class[name])} texts)" for name in sorted(by_class))
        raise DatasetRejectedError(
            "too_few_classes",
            f"A dataset needs at least 2 classes with at least {minimum} usable texts each; "
            f"found {found}.",
        )
    return classes, {name: by_class[name] for name in classes}


def _write_shards(
    staging: Path, dest: Path, dropped: set[int], classes: list[str], val: set[int]
) -> list[TextShard]:
    index = {name: n for n, name in enumerate(classes)}
    shards: list[TextShard] = []
    out: IO[str] | None = None
    try:
        with staging.open(encoding="utf-8") as rows:
            for ordinal, line in enumerate(rows):
                if ordinal in dropped:
                    continue
                staged: dict[str, Any] = json.loads(line)
                label = staged["label"]
                split = None if label is None else ("val" if ordinal in val else "train")
                record = {"text": staged["text"], "label": None, "split": split}
                if label is not None:
                    record["label"] = index[label]
                for key in ("line", "path"):
                    if staged[key] is not None:
                        record[key] = staged[key]
                if out is None or shards[-1].rows >= SHARD_ROWS:
                    if out is not None:
                        out.close()
                    shards.append(TextShard(f"texts-{len(shards):05d}.jsonl", 0))
                    out = (dest / shards[-1].path).open("w", encoding="utf-8")
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                shards[-1] = TextShard(shards[-1].path, shards[-1].rows + 1)
    finally:
        if out is not None:
            out.close()
    return shards


def iter_text_rows(root: Path, shards: list[TextShard]) -> Iterator[TextRow]:
    """The kept rows of a text dataset, in shard order."""
    for shard in shards:
        with (root / shard.path).open(encoding="utf-8") as rows:
            for line in rows:
                record = json.loads(line)
                label, split = record["label"], record["split"]
                yield TextRow(
                    text=record["text"],
                    label=None if label is None else int(label),
                    split=None if split is None else parse_split(split),
                )


def ingest_text_file(
    upload: Path,
    dest: Path,
    *,
    fmt: TextFormat,
    columns: TextColumns,
    limits: IngestLimits,
    val_fraction: float,
    seed: int,
    keep_unlabelled: bool,
    progress: Callable[[int, int], None] | None,
) -> IngestResult:
    """Read a CSV or JSON Lines upload into `dest` (an existing empty folder)."""
    reporter = Progress(progress, max(1, os.path.getsize(upload)))
    done = 0

    def on_bytes(size: int) -> None:
        nonlocal done
        done += size
        reporter.update(min(done, reporter.total))

    line_cap = limits.max_text_field_bytes * _LINE_CAP_FIELDS + 2**16
    # The csv module's field cap is process-wide; ours is the line cap (rows past it are
    # reported per row), so a quote left open cannot make one field swallow the whole file.
    csv.field_size_limit(max(csv.field_size_limit(), line_cap))
    read = read_csv_rows if fmt == "csv" else read_jsonl_rows
    skipped: list[SkippedFile] = []
    with upload.open("rb") as handle:
        result = build_text_dataset(
            read(handle, columns, line_cap, on_bytes),
            dest,
            limits=limits,
            val_fraction=val_fraction,
            seed=seed,
            keep_unlabelled=keep_unlabelled,
            skipped=skipped,
        )
    reporter.update(reporter.total)
    return result
