"""What an ingestion produces: the limits it runs under, the kept samples, the skipped rows and
files with their reasons, and the manifest that stores them."""

import random
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast, get_args

from worker.engine.modalities import modality_for

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
    # Text rows and files:
    "bad_encoding",
    "bad_row",
    "empty_text",
    "missing_label",
    "conflicting_labels",
    "not_text",
]
RejectCode = Literal[
    "unsupported_archive",
    "corrupt_archive",
    "too_many_members",
    "too_large",
    "bad_manifest",
    "no_images",
    "too_few_classes",
    "unsupported_upload",
    "bad_header",
    "no_texts",
]

MANIFEST_VERSION = 3
"""Version 2 added `modality` and text shards; version 3 stores images as tar shards too.
Older manifests still load (their images are one object each)."""
_READABLE_MANIFEST_VERSIONS = (1, 2, 3)


@dataclass(frozen=True)
class IngestLimits:
    max_members: int = 100_000
    max_member_bytes: int = 50 * 2**20
    # Counted from bytes actually written, so a zip bomb cannot lie its way past it.
    max_total_bytes: int = 5 * 2**30
    # Checked against the image header before any pixel is decoded.
    max_image_pixels: int = 40_000_000
    allowed_formats: frozenset[str] = frozenset({"JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF"})
    # Images or labelled texts; a smaller class cannot be split into train and val.
    min_images_per_class: int = 2
    # One text or label, in UTF-8 bytes (a text folder's .txt file is one text).
    max_text_field_bytes: int = 100_000


@dataclass(frozen=True)
class SkippedFile:
    path: str | None  # as written in the archive (or in the CSV manifest); None for a text row
    code: SkipCode
    reason: str
    line: int | None = None  # where the row starts in a CSV or JSON Lines upload


@dataclass(frozen=True)
class Sample:
    path: str  # relative to dest, posix separators
    label: int
    split: Split


@dataclass(frozen=True)
class TextShard:
    """A JSON Lines file of kept text rows: {"text", "label" (index or null), "split"} and where
    the row came from, its "line" in a CSV or JSON Lines upload or its "path" in an archive;
    for images, a tar file of kept images named by their sample paths (`rows`: images)."""

    path: str  # relative to dest
    rows: int


@dataclass(frozen=True)
class IngestResult:
    classes: list[str]
    samples: list[Sample]  # images (stored in `shards` from version 3); empty for text
    skipped: list[SkippedFile]
    class_counts: dict[str, dict[str, int]]
    modality: str = "image"
    """A name in the modality registry (`worker.engine.modalities`)."""
    shards: list[TextShard] = field(default_factory=list)
    unlabelled: int = 0  # texts kept without a label (for a language-model stage)
    unlisted_skipped: int = 0
    """Skipped rows and files counted but not listed in `skipped`: a result read back from a
    manifest lists the first MAX_LISTED_SKIPPED only."""

    @property
    def num_skipped(self) -> int:
        return len(self.skipped) + self.unlisted_skipped

    @property
    def num_labelled(self) -> int:
        return sum(counts["total"] for counts in self.class_counts.values())

    def to_manifest(self) -> dict[str, Any]:
        return {
            "version": MANIFEST_VERSION,
            "modality": self.modality,
            "classes": list(self.classes),
            "samples": [{"path": s.path, "label": s.label, "split": s.split} for s in self.samples],
            "shards": [{"path": s.path, "rows": s.rows} for s in self.shards],
            "unlabelled": self.unlabelled,
            "skipped": [skipped_dict(s) for s in self.skipped[:MAX_LISTED_SKIPPED]],
            "num_skipped": self.num_skipped,
            "class_counts": {name: dict(counts) for name, counts in self.class_counts.items()},
        }

    @classmethod
    def from_manifest(cls, data: dict[str, Any]) -> "IngestResult":
        if data.get("version") not in _READABLE_MANIFEST_VERSIONS:
            raise ValueError(f"unsupported manifest version {data.get('version')!r}")
        listed = len(data["skipped"])
        return cls(
            classes=[str(name) for name in data["classes"]],
            samples=[
                Sample(path=str(s["path"]), label=int(s["label"]), split=parse_split(s["split"]))
                for s in data["samples"]
            ],
            skipped=[
                SkippedFile(
                    path=None if s.get("path") is None else str(s["path"]),
                    code=parse_skip_code(s["code"]),
                    reason=str(s["reason"]),
                    line=None if s.get("line") is None else int(s["line"]),
                )
                for s in data["skipped"]
            ],
            class_counts={
                str(name): {str(k): int(v) for k, v in counts.items()}
                for name, counts in data["class_counts"].items()
            },
            modality=parse_modality(data.get("modality", "image")),
            shards=[
                TextShard(path=str(s["path"]), rows=int(s["rows"])) for s in data.get("shards", [])
            ],
            unlabelled=int(data.get("unlabelled", 0)),
            # Manifests written before the cap list every skipped row and carry no count.
            unlisted_skipped=int(data.get("num_skipped", listed)) - listed,
        )


MAX_LISTED_SKIPPED = 1000
"""Skipped files or rows a dataset lists (the rest are counted in `num_skipped`): a CSV of a
million bad rows must not make a dataset's row, and every GET of it, hundreds of megabytes.
A thousand is more than anyone reads and enough to see every kind of mistake an upload holds."""


def skipped_dict(skipped: SkippedFile) -> dict[str, Any]:
    entry: dict[str, Any] = {"path": skipped.path, "code": skipped.code, "reason": skipped.reason}
    if skipped.line is not None:
        entry["line"] = skipped.line
    return entry


class DatasetRejectedError(Exception):
    """The upload as a whole cannot become a dataset; `message` is meant for the uploader."""

    def __init__(self, code: RejectCode, message: str) -> None:
        super().__init__(message)
        self.code: RejectCode = code
        self.message = message

    # The worker may pickle this across processes; the default reduce would drop `code`.
    def __reduce__(self) -> tuple[type["DatasetRejectedError"], tuple[RejectCode, str]]:
        return type(self), (self.code, self.message)


@dataclass
class Progress:
    callback: Callable[[int, int], None] | None
    total: int
    reported: int = -1

    def update(self, done: int) -> None:
        # Roughly one call per percent, never two for the same count: the callback may write
        # to a database.
        if self.callback is None or done == self.reported:
            return
        if done == self.total or done - self.reported >= max(1, self.total // 100):
            self.reported = done
            self.callback(done, self.total)


def summary(skipped: list[SkippedFile], *, what: str = "files") -> str:
    if not skipped:
        return f"The upload holds no {what}."
    counts = Counter(s.code for s in skipped)
    listed = ", ".join(f"{code} {n}" for code, n in sorted(counts.items()))
    return f"Skipped {what}: {listed}."


_Item = TypeVar("_Item", bound=Hashable)


def pick_val(items: Sequence[_Item], val_fraction: float, seed: int) -> set[_Item]:
    """The validation share of one class's items (sorted by the caller), the same per seed."""
    # A fresh generator per class keeps each class's split independent of the other classes.
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    n = len(shuffled)
    count = min(n - 1, max(1, round(n * val_fraction))) if n >= 2 else 0
    return set(shuffled[:count])


def check_arguments(limits: IngestLimits, val_fraction: float) -> None:
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    sizes = (
        limits.max_members,
        limits.max_member_bytes,
        limits.max_total_bytes,
        limits.max_image_pixels,
        limits.min_images_per_class,
        limits.max_text_field_bytes,
    )
    if min(sizes) < 1:
        raise ValueError(f"every limit must be positive: {limits}")


def parse_split(value: object) -> Split:
    if value not in get_args(Split):
        raise ValueError(f"unknown split {value!r}")
    return cast(Split, value)


def parse_skip_code(value: object) -> SkipCode:
    if value not in get_args(SkipCode):
        raise ValueError(f"unknown skip code {value!r}")
    return cast(SkipCode, value)


def parse_modality(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"unknown modality {value!r}")
    return modality_for(value).name
