"""The artifact store as one local folder: the embedded default, and a single-host deployment."""

import contextlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from service.storage.base import (
    ArtifactStore,
    ObjectInfo,
    ObjectNotFoundError,
    StorageError,
    check_key,
    copy_stream,
    temp_sibling,
)


class LocalStore(ArtifactStore):
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).parts)

    def put_file(self, key: str, source: Path) -> None:
        target = self._path(key)
        temp = temp_sibling(target)
        shutil.move(source, temp)
        os.replace(temp, target)

    def put_stream(self, key: str, stream: BinaryIO) -> int:
        target = self._path(key)
        created = [folder for folder in target.parents if not folder.exists()]
        temp = temp_sibling(target)
        try:
            with temp.open("wb") as out:
                written = copy_stream(stream, out)
            os.replace(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)
            # A failed upload leaves no trace, not even the empty folders made for it.
            for folder in created:
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
        return written

    def put_dir(self, prefix: str, source: Path) -> None:
        target = self._path(prefix)
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(source, target)

    @contextmanager
    def open(self, key: str) -> Iterator[BinaryIO]:
        path = self._path(key)
        try:
            handle = path.open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFoundError(f"no object {key!r}") from exc
        with handle:
            yield handle

    def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            info = path.stat()
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise ObjectNotFoundError(f"no object {key!r}") from exc
        if not path.is_file():
            raise ObjectNotFoundError(f"{key!r} is a folder, not an object")
        return ObjectInfo(
            size=info.st_size,
            modified=datetime.fromtimestamp(info.st_mtime, UTC),
            version=f"{info.st_mtime_ns}-{info.st_size}",
        )

    def download(self, key: str, dest: Path) -> None:
        temp = temp_sibling(dest)
        try:
            with self.open(key) as source, temp.open("wb") as out:
                copy_stream(source, out)
            os.replace(temp, dest)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    @contextmanager
    def local_file(self, key: str, scratch: Path) -> Iterator[Path]:
        self.stat(key)  # ObjectNotFoundError as on any store
        yield self._path(key)

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def delete(self, prefix: str) -> None:
        path = self._path(prefix)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    def children(self, prefix: str) -> list[str]:
        path = self._path(prefix)
        return sorted(child.name for child in path.iterdir()) if path.is_dir() else []

    def check(self) -> None:
        try:
            self.put_bytes(".readyz", b"ok")
        except OSError as exc:
            raise StorageError(f"artifact folder {self.root} is not writable: {exc}") from exc
