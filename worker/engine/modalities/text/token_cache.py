"""A dataset's token ids kept in the host's cache, so each tokenizer and length tokenizes it once
per host, within the host cache's size budget.

An entry is addressed by what determines its content: the tokenizer (a hash of its
`tokenizer.json`), `max_length`, the truncation and a hash of the texts in order. A second job
on the same texts (another strategy, a retry, a resumed attempt) reads the ids instead of
tokenizing again. The cache is the worker's `service.storage.cache.LocalCache` (the engine
sees it only as `EntryCache`): its budget (`THAW_CACHE_BYTES`) and least-recently-used
eviction cover token entries and downloaded objects alike, two jobs that want the same entry
at once tokenize once (the second waits on the first's file lock and reads its entry), and an
entry being read is never evicted. An unreadable entry is tokenized again and dropped, so the
next run fills it afresh.
"""

import hashlib
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..base import EntryCache
from .tokens import Encoded

PREFIX = "tokens-"
SUFFIX = ".npz"


def entry_name(backend: Any, texts: Sequence[str], *, max_length: int, truncation: str) -> str:
    """The entry's name: a hash of the tokenizer, the length, the truncation and the texts."""
    digest = hashlib.sha256()
    digest.update(hashlib.sha256(backend.to_str().encode("utf-8")).digest())
    digest.update(f"{max_length}\0{truncation}\0{len(texts)}\0".encode())
    for text in texts:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return PREFIX + digest.hexdigest() + SUFFIX


def cached_encode(
    cache: EntryCache | None,
    backend: Any,
    texts: Sequence[str],
    *,
    max_length: int,
    truncation: str,
    tokenize: Callable[[], Encoded],
) -> Encoded:
    """`tokenize()`'s result for these texts, read from `cache` when an entry is there, else
    computed and stored; `cache` None tokenizes without one."""
    if cache is None:
        return tokenize()
    filled: list[Encoded] = []

    def fill(temporary: Path) -> None:
        filled.append(tokenize())
        _write(temporary, filled[0])

    entry = entry_name(backend, texts, max_length=max_length, truncation=truncation)
    with cache.hold(entry, fill) as path:
        if filled:
            return filled[0]
        stored = _read(path, len(texts))
        if stored is None:
            path.unlink(missing_ok=True)
    return stored if stored is not None else tokenize()


def _read(path: Path, count: int) -> Encoded | None:
    try:
        with np.load(path) as arrays:
            flat, offsets = arrays["ids"], arrays["offsets"]
            lengths, truncated = arrays["lengths"], arrays["truncated"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if len(offsets) != count + 1 or len(lengths) != count or len(truncated) != count:
        return None
    ids = [flat[offsets[i] : offsets[i + 1]].tolist() for i in range(count)]
    return Encoded(ids=ids, lengths=lengths.tolist(), truncated=truncated.tolist())


def _write(path: Path, encoded: Encoded) -> None:
    """Write the entry at `path`, which the cache renames into place once it is whole."""
    offsets = np.zeros(len(encoded.ids) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(row) for row in encoded.ids])
    flat = np.fromiter(
        (token for row in encoded.ids for token in row), dtype=np.int64, count=int(offsets[-1])
    )
    with path.open("wb") as file:
        np.savez(
            file,
            ids=flat,
            offsets=offsets,
            lengths=np.asarray(encoded.lengths, dtype=np.int64),
            truncated=np.asarray(encoded.truncated, dtype=bool),
        )
