"""A host's local cache of objects from the store, with a size budget.

Entries are addressed by what they hold, not where it came from: the id is a hash of the
store, key and content version (an object's ETag), so a changed object is a new entry and an
entry never needs invalidating. Several processes on one host share the folder safely:

- filling an entry holds an exclusive `flock` on its lock file, so the second process that wants
  the same entry waits for the first one's download instead of repeating it;
- the filled file or folder is renamed into place, so a reader sees a whole entry or none;
- a process using an entry holds a shared lock (`hold`), and eviction skips any entry whose lock
  it cannot take exclusively at once.

Eviction is least recently used (an entry's mtime is bumped on every use) and runs after each
fill until the entries fit `budget_bytes` again; an entry in use is never removed, so the cache
may exceed its budget while every entry is held.
"""

import fcntl
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from service.storage.base import remove_tree_or_file


def entry_id(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


class LocalCache:
    def __init__(self, root: Path, *, budget_bytes: int) -> None:
        self.root = root.resolve()
        self.budget_bytes = budget_bytes
        self.entries = self.root / "entries"
        self.locks = self.root / "locks"
        self.entries.mkdir(parents=True, exist_ok=True)
        self.locks.mkdir(parents=True, exist_ok=True)

    def get(self, entry: str, fill: Callable[[Path], None]) -> Path:
        """The entry's path, filling it first if absent: `fill(temp)` must create the file or
        folder `temp` (which it may write at leisure; nobody else sees it)."""
        path = self.entries / entry
        with self._locked(entry, fcntl.LOCK_SH):
            if path.exists():
                os.utime(path)
                return path
        with self._locked(entry, fcntl.LOCK_EX):
            if not path.exists():
                temp = self.entries / f".fill-{entry}-{os.getpid()}-{time.monotonic_ns()}"
                try:
                    fill(temp)
                    os.rename(temp, path)
                except BaseException:
                    remove_tree_or_file(temp)
                    raise
            os.utime(path)
        self.evict(keep=entry)
        return path

    @contextmanager
    def hold(self, entry: str, fill: Callable[[Path], None]) -> Iterator[Path]:
        """`get`, and keep the entry from eviction until the block ends."""
        path = self.get(entry, fill)
        with self._locked(entry, fcntl.LOCK_SH):
            if not path.exists():  # evicted between get and the lock: fill it again
                path = self.get(entry, fill)
            yield path

    def used_bytes(self) -> int:
        return sum(_size(path) for path in self.entries.iterdir() if not path.name.startswith("."))

    def evict(self, *, keep: str | None = None) -> None:
        entries = [
            path
            for path in self.entries.iterdir()
            if not path.name.startswith(".") and path.name != keep
        ]
        used = self.used_bytes()
        for path in sorted(entries, key=_last_used):
            if used <= self.budget_bytes:
                return
            with self._lock_file(path.name) as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # in use (held or being filled) by some process
                size = _size(path)
                remove_tree_or_file(path)
                used -= size

    @contextmanager
    def _lock_file(self, entry: str) -> Iterator[IO[bytes]]:
        with (self.locks / entry).open("ab") as handle:
            yield handle

    @contextmanager
    def _locked(self, entry: str, mode: int) -> Iterator[None]:
        with self._lock_file(entry) as handle:
            fcntl.flock(handle, mode)
            yield


def _size(path: Path) -> int:
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _last_used(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
