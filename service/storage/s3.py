"""The artifact store in any S3-compatible object store (AWS S3, MinIO, Ceph, R2), via boto3.

Credentials and region come from the standard AWS variables (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_REGION`/`AWS_DEFAULT_REGION`, or any boto3 source);
`THAW_S3_ENDPOINT_URL` points at a non-AWS endpoint. Uploads go through boto3's managed
transfer, multipart above one chunk, reading one part at a time; S3 publishes an object only
when its upload completes, so no reader sees a partial one.
"""

import io
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from service.storage.base import (
    CHUNK_BYTES,
    ArtifactStore,
    ObjectInfo,
    ObjectNotFoundError,
    StorageError,
    check_key,
)
from service.storage.cache import LocalCache, entry_id

_MISSING = {"404", "NoSuchKey", "NotFound"}
_PARALLEL_FILES = 16
"""Objects of one folder moved at once: a folder is often many small files."""
_TRANSFER = TransferConfig(
    multipart_threshold=CHUNK_BYTES, multipart_chunksize=CHUNK_BYTES, max_concurrency=4
)
# A stream's parts wait in memory for an upload thread: at most this many (s3transfer's
# default is 10; boto3's constructor does not take it).
_TRANSFER.max_in_memory_upload_chunks = 4


def _missing(exc: ClientError) -> bool:
    return str(exc.response.get("Error", {}).get("Code")) in _MISSING


class S3Store(ArtifactStore):
    def __init__(
        self, *, bucket: str, prefix: str, endpoint_url: str | None, cache: LocalCache
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.cache = cache
        self.client: Any = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            config=Config(
                retries={"max_attempts": 5, "mode": "standard"},
                max_pool_connections=_PARALLEL_FILES,
            ),
        )

    def _key(self, key: str) -> str:
        relative = str(check_key(key))
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def _folder(self, prefix: str) -> str:
        return self._key(prefix) + "/"

    def _relative(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1 :] if self.prefix else full_key

    @contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        """The client's failures as this interface's: missing objects, then everything else."""
        try:
            yield
        except ClientError as exc:
            if _missing(exc):
                raise ObjectNotFoundError(f"no object {key!r}") from exc
            raise StorageError(f"object store refused {key!r}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"object store unreachable for {key!r}: {exc}") from exc

    def put_file(self, key: str, source: Path) -> None:
        with self._errors(key):
            self.client.upload_file(str(source), self.bucket, self._key(key), Config=_TRANSFER)
        source.unlink()

    def put_stream(self, key: str, stream: BinaryIO) -> int:
        counted = _CountingReader(stream)
        with self._errors(key):
            self.client.upload_fileobj(counted, self.bucket, self._key(key), Config=_TRANSFER)
        return counted.read_bytes

    def put_dir(self, prefix: str, source: Path) -> None:
        self.delete(prefix)

        def upload(path: Path) -> None:
            key = f"{prefix}/{path.relative_to(source).as_posix()}"
            with self._errors(key):
                self.client.upload_file(str(path), self.bucket, self._key(key), Config=_TRANSFER)

        files = [path for path in sorted(source.rglob("*")) if path.is_file()]
        # Many small files: their round trips overlap (boto3 clients are thread-safe).
        with ThreadPoolExecutor(_PARALLEL_FILES) as pool:
            list(pool.map(upload, files))
        shutil.rmtree(source)

    @contextmanager
    def open(self, key: str) -> Iterator[BinaryIO]:
        with self._errors(key):
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        try:
            yield io.BufferedReader(_BodyReader(body), buffer_size=CHUNK_BYTES)
        finally:
            body.close()

    def stat(self, key: str) -> ObjectInfo:
        with self._errors(key):
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        return ObjectInfo(
            size=int(head["ContentLength"]),
            modified=head["LastModified"],
            version=str(head["ETag"]).strip('"'),
        )

    def download(self, key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        temp = dest.with_name(f".tmp-{dest.name}-{os.getpid()}")
        try:
            with self._errors(key):
                self.client.download_file(self.bucket, self._key(key), str(temp), Config=_TRANSFER)
            os.replace(temp, dest)
        finally:
            temp.unlink(missing_ok=True)

    def local_path(self, key: str) -> Path:
        try:
            info = self.stat(key)
        except ObjectNotFoundError:
            listing = self._list(self._folder(key))
            if not listing:
                raise
            return self._cached_folder(key, listing)
        entry = entry_id(self._identity(), key, info.version)
        path = self.cache.get(entry, lambda temp: self.download(key, temp))
        path.chmod(0o444)
        return path

    def _identity(self) -> str:
        return f"{self.endpoint_url or 'aws'}|{self.bucket}"

    def _cached_folder(self, prefix: str, listing: list[dict[str, Any]]) -> Path:
        versions = sorted(f"{item['Key']}={item['ETag']}" for item in listing)
        entry = entry_id(self._identity(), prefix + "/", *versions)

        def fill(temp: Path) -> None:
            folder = self._folder(prefix)

            def download(item: dict[str, Any]) -> None:
                relative = item["Key"][len(folder) :]
                self.download(f"{prefix}/{relative}", temp.joinpath(*relative.split("/")))

            with ThreadPoolExecutor(_PARALLEL_FILES) as pool:
                list(pool.map(download, listing))

        return self.cache.get(entry, fill)

    def _list(self, folder: str, *, delimiter: bool = False) -> list[dict[str, Any]]:
        """Every object under `folder` (which ends in `/`); with `delimiter`, also one
        `{"Prefix": ...}` item per sub-folder instead of its contents."""
        paginator = self.client.get_paginator("list_objects_v2")
        options: dict[str, str] = {"Bucket": self.bucket, "Prefix": folder}
        if delimiter:
            options["Delimiter"] = "/"
        items: list[dict[str, Any]] = []
        with self._errors(folder):
            for page in paginator.paginate(**options):
                items.extend(page.get("Contents", []))
                items.extend(page.get("CommonPrefixes", []))
        return items

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
            return True
        except ObjectNotFoundError:
            return bool(self._list(self._folder(key)))

    def delete(self, prefix: str) -> None:
        keys = [self._key(prefix), *(item["Key"] for item in self._list(self._folder(prefix)))]
        for start in range(0, len(keys), 1000):
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            with self._errors(prefix):
                self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )

    def children(self, prefix: str) -> list[str]:
        folder = self._folder(prefix)
        names = {
            (item.get("Key") or item["Prefix"])[len(folder) :].rstrip("/")
            for item in self._list(folder, delimiter=True)
        }
        return sorted(name for name in names if name)

    def check(self) -> None:
        try:
            with self._errors(".readyz"):
                self.client.head_bucket(Bucket=self.bucket)
        except ObjectNotFoundError as exc:
            raise StorageError(f"bucket {self.bucket!r} does not exist") from exc
        self.put_bytes(".readyz", b"ok")


class _CountingReader(io.RawIOBase):
    """The upload's source, counting what boto3 reads from it."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.read_bytes += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class _BodyReader(io.RawIOBase):
    """botocore's streaming body as a raw stream, so callers get a standard buffered reader."""

    def __init__(self, body: Any) -> None:
        self.body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)
