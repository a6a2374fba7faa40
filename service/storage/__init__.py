"""Artifact storage, addressed by key: the interface, its two backends, and the host cache.

`open_store(settings)` picks the backend: `THAW_STORAGE_URL=s3://bucket/prefix` is an
S3-compatible object store; unset, the local folder `THAW_STORAGE_DIR`.
"""

from urllib.parse import urlparse

from service.settings import Settings
from service.storage.base import (
    ArtifactStore,
    ObjectInfo,
    ObjectNotFoundError,
    StorageError,
    StorageKeyError,
)
from service.storage.cache import LocalCache
from service.storage.local import LocalStore

__all__ = [
    "ArtifactStore",
    "LocalCache",
    "LocalStore",
    "ObjectInfo",
    "ObjectNotFoundError",
    "StorageError",
    "StorageKeyError",
    "open_store",
]


def open_store(settings: Settings) -> ArtifactStore:
    url = settings.storage_url
    if url is None:
        return LocalStore(settings.resolved_storage_dir)
    parsed = urlparse(url)
    if parsed.scheme == "s3" and parsed.netloc:
        from service.storage.s3 import S3Store  # boto3 loads only for a fleet

        cache = LocalCache(settings.resolved_cache_dir, budget_bytes=settings.cache_bytes)
        return S3Store(
            bucket=parsed.netloc,
            prefix=parsed.path,
            endpoint_url=settings.s3_endpoint_url,
            cache=cache,
        )
    raise StorageError(
        f"THAW_STORAGE_URL {url!r} is not s3://bucket[/prefix] (unset it for a local folder)"
    )
