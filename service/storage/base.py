"""The artifact store's interface: uploads, extracted datasets, checkpoints and model artifacts,
addressed by key.

Keys are slash-separated relative paths (`models/mv_1/weights.safetensors`); a "folder" is a
key prefix, always matched with its trailing `/`, so `models/j/attempt-1` never names anything
under `models/j/attempt-10`. Two backends implement it: `LocalStore` (a folder) and `S3Store`
(any S3-compatible object store). Every write is all-or-nothing: a reader sees the whole new
object or none of it.
"""

import hashlib
import io
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import BinaryIO

CHUNK_BYTES = 8 * 2**20
"""Streaming granularity: one read, one multipart part."""


class StorageError(Exception):
    """The store could not do what was asked (unreachable, refused, misconfigured)."""


class StorageKeyError(StorageError, ValueError):
    """A key that cannot address anything (absolute, `..`, empty parts)."""


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """No object under this key. A `FileNotFoundError` too, for callers written for folders."""


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    modified: datetime
    version: str
    """Changes whenever the object's content does (ETag on S3, mtime and size locally): the
    worker cache addresses entries by it."""


def check_key(key: str) -> PurePosixPath:
    parts = PurePosixPath(key).parts
    if not parts or key.startswith("/") or any(part in ("..", ".", "") for part in parts):
        raise StorageKeyError(f"invalid storage key {key!r}")
    return PurePosixPath(*parts)


class ArtifactStore(ABC):
    @abstractmethod
    def put_file(self, key: str, source: Path) -> None:
        """Store `source` under `key`, consuming (moving or uploading then removing) the file."""

    @abstractmethod
    def put_stream(self, key: str, stream: BinaryIO) -> int:
        """Store what `stream` yields under `key`, a chunk at a time (multipart on S3), never
        whole in memory; returns the bytes written."""

    def put_bytes(self, key: str, data: bytes) -> None:
        self.put_stream(key, io.BytesIO(data))

    @abstractmethod
    def put_dir(self, prefix: str, source: Path) -> None:
        """Store a folder tree under `prefix` (replacing what was there), consuming it."""

    @abstractmethod
    @contextmanager
    def open(self, key: str) -> Iterator[BinaryIO]:
        """The object as a readable binary stream; `ObjectNotFoundError` if there is none."""

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as stream:
            return stream.read()

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size, time and content version of one object; `ObjectNotFoundError` if none."""

    def size(self, key: str) -> int:
        return self.stat(key).size

    @abstractmethod
    def download(self, key: str, dest: Path) -> None:
        """Copy the object to the local file `dest`, which appears whole or not at all."""

    @contextmanager
    def local_file(self, key: str, scratch: Path) -> Iterator[Path]:
        """The object as a local file for the block, for readers that seek (zip, tar): a copy
        downloaded into the folder `scratch` and removed afterwards; the local store's own
        file, which must only be read."""
        target = scratch / f".object-{os.getpid()}-{os.urandom(6).hex()}"
        try:
            self.download(key, target)
            yield target
        finally:
            target.unlink(missing_ok=True)

    @abstractmethod
    def local_path(self, key: str) -> Path:
        """A local file or folder holding `key`, for code (PIL, torch) that reads paths; on an
        object store a read-only copy in the local cache.

        Transitional: the fleet issue's call-site migration replaces every use with `open`,
        `download` or the cache, then removes this method."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """An object under exactly this key, or a folder (anything under `key/`)."""

    @abstractmethod
    def delete(self, prefix: str) -> None:
        """Delete the object `prefix` and everything under the folder `prefix/` (never a key
        that merely starts with the same characters); missing keys are fine."""

    @abstractmethod
    def children(self, prefix: str) -> list[str]:
        """Names directly under the folder `prefix/`, sorted; none when it does not exist."""

    @abstractmethod
    def check(self) -> None:
        """Raise `StorageError` unless the store can be read and written now (readiness)."""

    def sha256(self, key: str) -> str:
        digest = hashlib.sha256()
        with self.open(key) as stream:
            for chunk in iter(lambda: stream.read(CHUNK_BYTES), b""):
                digest.update(chunk)
        return digest.hexdigest()


def temp_sibling(target: Path) -> Path:
    """A new empty file beside `target`, so that renaming it onto `target` is atomic."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
    os.close(handle)
    return Path(name)


def copy_stream(source: BinaryIO, target: BinaryIO) -> int:
    written = 0
    for chunk in iter(lambda: source.read(CHUNK_BYTES), b""):
        target.write(chunk)
        written += len(chunk)
    return written


def remove_tree_or_file(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
