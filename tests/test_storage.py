"""The artifact store's contract, run against both backends: the local folder, and S3Store
talking to an S3-compatible server in its own process (moto_server)."""

import functools
import hashlib
import io
import multiprocessing
import os
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from service.settings import Settings
from service.storage import (
    ArtifactStore,
    LocalCache,
    LocalStore,
    ObjectNotFoundError,
    StorageError,
    StorageKeyError,
    open_store,
)
from tests.fleet.s3server import S3Server, moto_server


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path, s3_server: S3Server) -> ArtifactStore:
    if request.param == "local":
        return LocalStore(tmp_path / "artifacts")
    bucket = f"b{os.urandom(4).hex()}"
    s3_server.create_bucket(bucket)
    settings = Settings(
        data_dir=tmp_path / "data",
        storage_url=f"s3://{bucket}/deploy",
        s3_endpoint_url=s3_server.endpoint_url,
    )
    return open_store(settings)


class _Chunks(io.RawIOBase):
    """A non-seekable stream of `total` pseudo-random bytes that may fail after `fail_after`."""

    def __init__(self, total: int, fail_after: int | None = None) -> None:
        self.total, self.sent, self.fail_after = total, 0, fail_after
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self.fail_after is not None and self.sent >= self.fail_after:
            raise ConnectionResetError("client went away")
        size = min(len(buffer), self.total - self.sent, 1 << 20)
        data = hashlib.sha512(str(self.sent).encode()).digest() * (size // 64 + 1)
        buffer[:size] = data[:size]
        self.digest.update(data[:size])
        self.sent += size
        return size


def test_bytes_round_trip_stat_and_missing_keys(store: ArtifactStore) -> None:
    store.put_bytes("models/mv_1/config.json", b'{"a": 1}')
    assert store.get_bytes("models/mv_1/config.json") == b'{"a": 1}'
    with store.open("models/mv_1/config.json") as stream:
        assert stream.read(3) == b'{"a'
        assert stream.read() == b'": 1}'
    info = store.stat("models/mv_1/config.json")
    assert info.size == 8 == store.size("models/mv_1/config.json")
    assert store.exists("models/mv_1/config.json")
    assert store.exists("models/mv_1")  # a folder
    assert not store.exists("models/mv_2")
    store.put_bytes("models/mv_1/config.json", b"{}")
    assert store.stat("models/mv_1/config.json").version != info.version
    with pytest.raises(ObjectNotFoundError):
        store.get_bytes("models/none")
    with pytest.raises(FileNotFoundError):  # what callers written for folders catch
        store.stat("models/none")
    for bad in ("/etc/passwd", "a/../b", ""):
        with pytest.raises(StorageKeyError):
            store.put_bytes(bad, b"x")


def test_large_stream_is_stored_whole_and_hashed_from_the_stream(store: ArtifactStore) -> None:
    source = _Chunks(total=17 * 2**20 + 123)  # three multipart parts on S3
    assert store.put_stream("uploads/ds_1/archive", source) == source.total
    assert store.size("uploads/ds_1/archive") == source.total
    assert store.sha256("uploads/ds_1/archive") == source.digest.hexdigest()


def test_a_failed_upload_leaves_the_previous_object_untouched(store: ArtifactStore) -> None:
    store.put_bytes("uploads/ds_1/archive", b"old")
    with pytest.raises(ConnectionResetError):
        store.put_stream("uploads/ds_1/archive", _Chunks(total=20 * 2**20, fail_after=10 * 2**20))
    assert store.get_bytes("uploads/ds_1/archive") == b"old"
    with pytest.raises(ConnectionResetError):
        store.put_stream("uploads/ds_2/archive", _Chunks(total=20 * 2**20, fail_after=10 * 2**20))
    assert not store.exists("uploads/ds_2/archive")
    assert store.children("uploads") == ["ds_1"]  # not even an empty folder for ds_2


def test_delete_removes_exactly_one_folder(store: ArtifactStore) -> None:
    for attempt in ("attempt-1", "attempt-10", "attempt-11"):
        store.put_bytes(f"models/job_1/{attempt}/weights.safetensors", attempt.encode())
    store.put_bytes("models/job_1/attempt-1x", b"a sibling object")
    store.delete("models/job_1/attempt-1")
    assert store.children("models/job_1") == ["attempt-10", "attempt-11", "attempt-1x"]
    assert store.get_bytes("models/job_1/attempt-10/weights.safetensors") == b"attempt-10"
    store.delete("models/job_1/attempt-1x")  # one object
    store.delete("models/job_1/never-written")  # missing is fine
    assert store.children("models/job_1") == ["attempt-10", "attempt-11"]
    store.delete("models/job_1")
    assert store.children("models/job_1") == []
    assert not store.exists("models/job_1")


def test_folders_put_listed_and_read_through_local_path(
    store: ArtifactStore, tmp_path: Path
) -> None:
    source = tmp_path / "export"
    (source / "sub").mkdir(parents=True)
    (source / "weights.safetensors").write_bytes(b"w" * 1000)
    (source / "sub" / "labels.json").write_bytes(b'["a"]')
    store.put_bytes("models/mv_1/stale.bin", b"replaced by put_dir")
    store.put_dir("models/mv_1", source)
    assert not source.exists()  # consumed
    assert store.children("models/mv_1") == ["sub", "weights.safetensors"]
    folder = store.local_path("models/mv_1")
    assert (folder / "weights.safetensors").read_bytes() == b"w" * 1000
    assert (folder / "sub" / "labels.json").read_bytes() == b'["a"]'
    assert not (folder / "stale.bin").exists()
    single = store.local_path("models/mv_1/weights.safetensors")
    assert single.read_bytes() == b"w" * 1000
    target = tmp_path / "copies" / "w.bin"
    store.download("models/mv_1/weights.safetensors", target)
    assert target.read_bytes() == b"w" * 1000
    assert [p.name for p in target.parent.iterdir()] == ["w.bin"]  # no temporary left


def test_local_file_holds_the_object_for_the_block_only(
    store: ArtifactStore, tmp_path: Path
) -> None:
    store.put_bytes("uploads/ds_1/archive", b"PK\x03\x04 zip bytes")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with store.local_file("uploads/ds_1/archive", scratch) as path:
        assert path.read_bytes() == b"PK\x03\x04 zip bytes"
    if isinstance(store, LocalStore):
        assert path == store.root / "uploads" / "ds_1" / "archive"  # no copy of a local object
    else:
        assert not path.exists()
        assert list(scratch.iterdir()) == []
    with pytest.raises(ObjectNotFoundError), store.local_file("uploads/none", scratch):
        pass


def test_put_file_consumes_its_source(store: ArtifactStore, tmp_path: Path) -> None:
    source = tmp_path / "upload.part"
    source.write_bytes(b"archive")
    store.put_file("uploads/ds_9/archive", source)
    assert not source.exists()
    assert store.get_bytes("uploads/ds_9/archive") == b"archive"


def test_s3_local_path_is_a_read_only_cached_copy_of_the_current_object(
    s3_server: S3Server, tmp_path: Path
) -> None:
    s3_server.create_bucket("cached")
    settings = Settings(
        data_dir=tmp_path, storage_url="s3://cached", s3_endpoint_url=s3_server.endpoint_url
    )
    store = open_store(settings)
    store.put_bytes("models/mv_1/config.json", b"v1")
    first = store.local_path("models/mv_1/config.json")
    assert first.is_relative_to(settings.resolved_cache_dir)
    assert not os.access(first, os.W_OK) or os.geteuid() == 0
    assert first.stat().st_mode & 0o222 == 0
    assert store.local_path("models/mv_1/config.json") == first  # a hit
    store.put_bytes("models/mv_1/config.json", b"v2")
    second = store.local_path("models/mv_1/config.json")
    assert second != first
    assert second.read_bytes() == b"v2"


def test_readiness_check_reports_the_stores_real_errors(
    s3_server: S3Server, tmp_path: Path
) -> None:
    missing_bucket = Settings(
        data_dir=tmp_path, storage_url="s3://no-such-bucket", s3_endpoint_url=s3_server.endpoint_url
    )
    with pytest.raises(StorageError):
        open_store(missing_bucket).check()
    unreachable = Settings(
        data_dir=tmp_path, storage_url="s3://b", s3_endpoint_url="http://127.0.0.1:9"
    )
    store = open_store(unreachable)
    store.client.meta.config.retries = {"max_attempts": 1}
    with pytest.raises(StorageError):
        store.check()
    with pytest.raises(StorageError, match="s3://bucket"):
        open_store(Settings(data_dir=tmp_path, storage_url="ftp://somewhere"))
    file_not_folder = tmp_path / "a-file"
    file_not_folder.write_bytes(b"")
    local = LocalStore(tmp_path / "ok")
    local.root = file_not_folder
    with pytest.raises(StorageError):
        local.check()


def test_cache_keeps_to_its_budget_least_recently_used_first(tmp_path: Path) -> None:
    cache = LocalCache(tmp_path / "cache", budget_bytes=250)

    def fill_with(size: int):  # type: ignore[no-untyped-def]
        return lambda temp: temp.write_bytes(b"x" * size)

    first = cache.get("a", fill_with(100))
    cache.get("b", fill_with(100))
    os.utime(first, (1, 1))  # "a" was used long ago
    with cache.hold("b", fill_with(100)):
        os.utime(cache.entries / "b", (0, 0))  # now the least recently used, but held
        cache.get("c", fill_with(100))
        # Over budget: "b" is the oldest but in use, so "a" goes.
        assert sorted(p.name for p in cache.entries.iterdir()) == ["b", "c"]
    cache.get("d", fill_with(100))
    assert sorted(p.name for p in cache.entries.iterdir()) == ["c", "d"]
    assert cache.used_bytes() == 200


def _fill_slowly(log: str, temp: Path) -> None:
    with open(log, "a") as out:
        out.write(f"{os.getpid()}\n")
    time.sleep(1.0)  # long enough that the other process asks while this one fills
    temp.write_bytes(b"weights" * 1000)


def _get_entry(root: str, log: str, ready: Any, go: Any) -> str:
    cache = LocalCache(Path(root), budget_bytes=1 << 30)
    ready.wait()
    go.wait()
    return str(cache.get("same-entry", functools.partial(_fill_slowly, log)))


def _s3_local_path(data_dir: str, storage_url: str, endpoint: str, key: str) -> str:
    store = open_store(
        Settings(data_dir=Path(data_dir), storage_url=storage_url, s3_endpoint_url=endpoint)
    )
    return str(store.local_path(key))


def test_two_processes_wanting_one_entry_fill_it_once(tmp_path: Path) -> None:
    spawn = multiprocessing.get_context("spawn")
    log = tmp_path / "fills.log"
    with spawn.Manager() as manager, ProcessPoolExecutor(2, mp_context=spawn) as pool:
        ready, go = manager.Barrier(3), manager.Event()
        futures = [
            pool.submit(_get_entry, str(tmp_path / "cache"), str(log), ready, go) for _ in range(2)
        ]
        ready.wait()
        go.set()
        paths = {future.result(timeout=60) for future in futures}
    assert len(paths) == 1
    assert Path(paths.pop()).read_bytes() == b"weights" * 1000
    assert len(log.read_text().splitlines()) == 1  # the second process waited, then hit
    assert [p.name for p in (tmp_path / "cache" / "entries").iterdir()] == ["same-entry"]


def test_two_hosts_processes_read_one_s3_object_through_one_cache(
    s3_server: S3Server, tmp_path: Path
) -> None:
    s3_server.create_bucket("shared-cache")
    url = "s3://shared-cache/p"
    store = open_store(
        Settings(data_dir=tmp_path, storage_url=url, s3_endpoint_url=s3_server.endpoint_url)
    )
    source = _Chunks(total=9 * 2**20)
    store.put_stream("models/mv_1/weights.safetensors", source)
    # The server is shared with this file's other tests, which read the same key elsewhere.
    earlier = s3_server.requests_for("GET", "models/mv_1/weights.safetensors")
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=spawn) as pool:
        futures = [
            pool.submit(
                _s3_local_path,
                str(tmp_path),
                url,
                s3_server.endpoint_url,
                "models/mv_1/weights.safetensors",
            )
            for _ in range(2)
        ]
        paths = {future.result(timeout=60) for future in futures}
    assert len(paths) == 1
    path = Path(paths.pop())
    assert hashlib.sha256(path.read_bytes()).hexdigest() == source.digest.hexdigest()
    leftovers = [p.name for p in path.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    # Downloaded once: the two processes together sent the object store the GETs (ranged
    # parts) that one download sends, counted in the server's own request log.
    key = "models/mv_1/weights.safetensors"
    after_the_cache = s3_server.requests_for("GET", key)
    through_the_cache = after_the_cache - earlier
    store.download(key, tmp_path / "once")
    one_download = s3_server.requests_for("GET", key) - after_the_cache
    assert one_download >= 1
    assert through_the_cache == one_download


def test_readyz_names_an_object_store_it_cannot_reach(s3_server: S3Server, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from service.main import create_app

    settings = Settings(
        data_dir=tmp_path,
        storage_url="s3://bucket-never-made",
        s3_endpoint_url=s3_server.endpoint_url,
        reaper_interval_seconds=3600,
    )
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["storage"] == "error: StorageError"
        s3_server.create_bucket("bucket-never-made")
        assert client.get("/readyz").json()["checks"]["storage"] == "ok"
