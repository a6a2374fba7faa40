"""The engine's `FeatureStore` on the artifact store, shared by every job on every host.

An entry is one safetensors file, `features/<dataset>/<key>.safetensors` (the engine's key
covers the weights, preprocessing, items and view; the dataset folder keeps a dataset's
entries together). Writing goes through `ArtifactStore.put_file`, which publishes an object
whole (a rename locally, a completed upload on S3): a reader never sees a partial entry, and
two writers racing leave one whole entry, either one's. Reading goes through `local_path`: the
file itself on a local store, this host's cache (`THAW_CACHE_DIR`, by the object's version) on
S3. On one host, a job that computes an entry holds an exclusive lock on it, so concurrent
trials there wait for one computation and read it; on separate hosts both may compute it, and
both entries are valid.
"""

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from service.storage import ArtifactStore, ObjectNotFoundError

FEATURES_PREFIX = "features"
TENSOR_NAME = "features"


def dataset_features_prefix(dataset_id: str) -> str:
    """Where a dataset's shared features live in the store."""
    return f"{FEATURES_PREFIX}/{dataset_id}"


class ArtifactFeatureStore:
    def __init__(self, store: ArtifactStore, *, prefix: str, lock_dir: Path) -> None:
        self.store = store
        self.prefix = prefix
        self.lock_dir = lock_dir

    def _object(self, key: str) -> str:
        return f"{self.prefix}/{key}.safetensors"

    def get(self, key: str) -> Tensor | None:
        try:
            path = self.store.local_path(self._object(key))
            return load_file(path)[TENSOR_NAME]
        except (ObjectNotFoundError, OSError, SafetensorError, KeyError):
            # Absent, or unreadable: either way the caller computes it and writes it again.
            return None

    def put(self, key: str, features: Tensor) -> None:
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=self.lock_dir, suffix=".safetensors")
        os.close(handle)
        try:
            save_file({TENSOR_NAME: features.contiguous()}, temporary)
            self.store.put_file(self._object(key), Path(temporary))
        finally:
            Path(temporary).unlink(missing_ok=True)

    @contextmanager
    def filling(self, key: str) -> Iterator[None]:
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        with (self.lock_dir / f"{key}.lock").open("ab") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
