"""A dataset's token ids kept on disk, so each tokenizer and length tokenizes it once per host.

An entry is addressed by what determines its content: the tokenizer (a hash of its
`tokenizer.json`), `max_length`, the truncation and a hash of the texts in order. A second job
on the same texts (another strategy, a retry, a resumed attempt) reads the ids instead of
tokenizing again. Entries are written under a temporary name and renamed into place, so two
jobs on one host that fill the same entry at once each write a whole file and a reader sees a
whole entry or none. An unreadable entry is tokenized again and rewritten.
"""

import hashlib
import os
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .tokens import Encoded

SUFFIX = ".npz"


def entry_name(backend: Any, texts: Sequence[str], *, max_length: int, truncation: str) -> str:
    """The entry's file name: a hash of the tokenizer, the length, the truncation and the texts."""
    digest = hashlib.sha256()
    digest.update(hashlib.sha256(backend.to_str().encode("utf-8")).digest())
    digest.update(f"{max_length}\0{truncation}\0{len(texts)}\0".encode())
    for text in texts:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest() + SUFFIX


def cached_encode(
    folder: Path | None,
    backend: Any,
    texts: Sequence[str],
    *,
    max_length: int,
    truncation: str,
    tokenize: Callable[[], Encoded],
) -> Encoded:
    """`tokenize()`'s result for these texts, read from `folder` when an entry is there, else
    computed and stored; `folder` None tokenizes without a cache."""
    if folder is None:
        return tokenize()
    path = folder / entry_name(backend, texts, max_length=max_length, truncation=truncation)
    stored = _read(path, len(texts))
    if stored is not None:
        os.utime(path)  # recently used: a host's cleanup can drop the oldest entries first
        return stored
    encoded = tokenize()
    _write(path, encoded)
    return encoded


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
    path.parent.mkdir(parents=True, exist_ok=True)
    offsets = np.zeros(len(encoded.ids) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(row) for row in encoded.ids])
    flat = np.fromiter(
        (token for row in encoded.ids for token in row), dtype=np.int64, count=int(offsets[-1])
    )
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=SUFFIX)
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(
                file,
                ids=flat,
                offsets=offsets,
                lengths=np.asarray(encoded.lengths, dtype=np.int64),
                truncated=np.asarray(encoded.truncated, dtype=bool),
            )
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
