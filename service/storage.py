"""Artifact storage: uploads, extracted datasets, checkpoints and model artifacts, addressed by key.

Keys are slash-separated relative paths (`models/mv_1/weights.safetensors`). The local backend keeps
them under one folder; an object-store backend implements the same methods.
"""

import hashlib
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path, PurePosixPath


class StorageKeyError(ValueError):
    pass


class ArtifactStore(ABC):
    @abstractmethod
    def put_file(self, key: str, source: Path) -> None:
        """Store `source` under `key`, consuming (moving) the file."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def put_dir(self, prefix: str, source: Path) -> None:
        """Store a folder tree under `prefix`, consuming it."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def local_path(self, key: str) -> Path:
        """A local file or folder holding `key`, for code (PIL, torch) that reads paths."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int: ...

    @abstractmethod
    def delete(self, prefix: str) -> None:
        """Delete a key or everything under a prefix; missing keys are fine."""

    @abstractmethod
    def children(self, prefix: str) -> list[str]:
        """Names directly under a prefix, sorted; none when it does not exist."""

    def sha256(self, key: str) -> str:
        digest = hashlib.sha256()
        with self.local_path(key).open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()


class LocalStore(ArtifactStore):
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        parts = PurePosixPath(key).parts
        if not parts or key.startswith("/") or any(part in ("..", ".", "") for part in parts):
            raise StorageKeyError(f"invalid storage key {key!r}")
        return self.root.joinpath(*parts)

    def _temp_sibling(self, target: Path) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        os.close(handle)
        return Path(name)

    def put_file(self, key: str, source: Path) -> None:
        target = self._path(key)
        temp = self._temp_sibling(target)
        shutil.move(source, temp)
        os.replace(temp, target)

    def put_bytes(self, key: str, data: bytes) -> None:
        target = self._path(key)
        temp = self._temp_sibling(target)
        temp.write_bytes(data)
        os.replace(temp, target)

    def put_dir(self, prefix: str, source: Path) -> None:
        target = self._path(prefix)
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(source, target)

    def get_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def delete(self, prefix: str) -> None:
        path = self._path(prefix)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    def children(self, prefix: str) -> list[str]:
        path = self._path(prefix)
        return sorted(child.name for child in path.iterdir()) if path.is_dir() else []
