"""A dataset upload streams through the API into the object store: multipart, nothing on the
API's disk (watched while the request runs: every file the process holds open for writing,
its temporary folder and its data folder), and a refused upload leaves no object, no unfinished
multipart upload and no row. An image dataset is stored as a few shards, read back through the
host cache; one stored one object per image (manifest version 2) still loads. In-process API on
S3 (moto_server in its own process)."""

import json
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from service.cli import migrate_database
from service.context import AppContext
from service.datasets.service import (
    archive_key,
    dataset_items,
    files_prefix,
    manifest_key,
    process_upload,
)
from service.settings import Settings
from tests.conftest import digits_split, new_key, png_bytes, zip_of_classes
from tests.fleet.s3server import S3Server

BUCKET = "fleet-uploads"
PREFIX = "thaw"
PART = 8 * 2**20
BOUNDARY = b"thaw-boundary"


@pytest.fixture(scope="module")
def temp_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The API process's temporary folder (TMPDIR, and `tempfile`'s cached copy of it), so that
    a spill through `tempfile` lands where the upload test watches."""
    folder = tmp_path_factory.mktemp("api-tmp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(folder))
        patch.setattr(tempfile, "tempdir", str(folder))
        yield folder


@pytest.fixture(scope="module")
def api(
    s3_server: S3Server, temp_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    s3_server.create_bucket(BUCKET)
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("api-host"),
        storage_url=f"s3://{BUCKET}/{PREFIX}",
        s3_endpoint_url=s3_server.endpoint_url,
        reaper_interval_seconds=3600,
        max_upload_bytes=3 * PART,
    )
    migrate_database(settings)
    with TestClient(_app(settings)) as client:
        yield client


def _app(settings: Settings) -> Any:
    from service.main import create_app

    return create_app(settings)


def _context(client: TestClient) -> AppContext:
    context: AppContext = client.app.state.context  # type: ignore[attr-defined]
    return context


def _s3(s3_server: S3Server) -> Any:
    return boto3.client("s3", endpoint_url=s3_server.endpoint_url)


def _body(size: int, *, head: bytes = b"PK\x03\x04", closed: bool = True) -> Iterator[bytes]:
    """A multipart body whose file field holds `size` bytes starting with `head`, sent a MiB
    at a time with no Content-Length (chunked), as a client streaming a large file does."""
    yield (
        b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="file"; '
        b'filename="big.zip"\r\n\r\n' + head
    )
    sent = len(head)
    while sent < size:
        piece = min(2**20, size - sent)
        yield os.urandom(piece)
        sent += piece
    if closed:
        yield b"\r\n--" + BOUNDARY + b"--\r\n"


def _post(client: TestClient, auth: dict[str, str], body: Iterator[bytes]) -> Any:
    headers = {**auth, "Content-Type": f"multipart/form-data; boundary={BOUNDARY.decode()}"}
    return client.post("/v1/datasets", headers=headers, content=body)


def _keys(s3: Any) -> set[str]:
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/uploads/")
    return {item["Key"] for item in listed.get("Contents", [])}


def _file_sizes(folders: list[Path]) -> dict[str, int]:
    sizes = {}
    for folder in folders:
        for path in folder.rglob("*"):
            try:
                if path.is_file():
                    sizes[str(path)] = path.stat().st_size
            except FileNotFoundError:  # removed while listed
                pass
    return sizes


def _files_open_for_writing() -> dict[str, int]:
    """This process's open regular files that it may write, by name (an unlinked or O_TMPFILE
    temporary file, which no folder listing shows, reads "... (deleted)"), with their sizes."""
    files = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            if not target.startswith("/"):  # a socket, pipe or anonymous inode
                continue
            flags = next(
                int(line.split()[1], 8)
                for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines()
                if line.startswith("flags:")
            )
            status = os.stat(f"/proc/self/fd/{fd}")
        except (FileNotFoundError, StopIteration):  # closed while looked at
            continue
        if flags & os.O_ACCMODE != os.O_RDONLY and os.path.isfile(f"/proc/self/fd/{fd}"):
            files[f"{target} (fd {fd})"] = status.st_size
    return files


@contextmanager
def _disk_watch(folders: list[Path], allowed: str) -> Iterator[dict[str, int]]:
    """While the body runs, every file in `folders` that was not there (or not that large)
    before, and every file this process opens for writing (files it held open before, such as
    pytest's capture of stdout, are left out), except paths that start with `allowed` (the
    database). Polled in a thread, so a spill that is removed before the request ends is seen
    too; yields name -> largest size seen, filled when the body ends."""
    before_files = _file_sizes(folders)
    before_open = dict.fromkeys(_files_open_for_writing(), 2**63)
    written: dict[str, int] = {}
    done = threading.Event()

    def poll() -> None:
        while True:
            ending = done.is_set()
            for seen, before in (
                (_file_sizes(folders), before_files),
                (_files_open_for_writing(), before_open),
            ):
                for name, size in seen.items():
                    if not name.startswith(allowed) and size > before.get(name, -1):
                        written[name] = max(size, written.get(name, 0))
            if ending:
                return
            done.wait(0.002)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        yield written
    finally:
        done.set()
        watcher.join()


@pytest.mark.parametrize("size", [2 * PART + 12345, 100_000], ids=["three-parts", "small"])
def test_an_upload_streams_to_the_store_in_parts_and_never_lands_on_the_api_disk(
    api: TestClient, s3_server: S3Server, temp_dir: Path, size: int
) -> None:
    context = _context(api)
    auth = new_key(context, f"streamer-{size}")
    database = str(make_url(context.settings.resolved_database_url).database)
    folders = [temp_dir.resolve(), context.settings.data_dir.resolve()]
    with _disk_watch(folders, allowed=database) as written:
        answer = _post(api, auth, _body(size))
    assert answer.status_code == 202, answer.text
    # At no time during the request was anything of any size written outside the database (its
    # rows and journal), except the processing task's message in the folder broker: not in the
    # temporary folder, not elsewhere in the data folder, not in any file the process held open.
    broker = str(context.settings.broker_folder)
    assert {name: size for name, size in written.items() if not name.startswith(broker)} == {}
    assert all(size < 2**16 for size in written.values()), written
    dataset_id = answer.json()["id"]
    head = _s3(s3_server).head_object(Bucket=BUCKET, Key=f"{PREFIX}/{archive_key(dataset_id)}")
    assert head["ContentLength"] == size == answer.json()["upload_bytes"]
    if size > PART:
        assert str(head["ETag"]).strip('"').endswith("-3")  # published by a 3-part upload


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        pytest.param(lambda: _body(4 * PART), 413, "upload_too_large", id="over-the-cap"),
        pytest.param(
            lambda: _body(PART + 1, head=b"not a dataset"), 415, "unsupported_upload", id="no-kind"
        ),
        pytest.param(lambda: _body(PART + 1, closed=False), 422, "missing_file", id="cut-short"),
    ],
)
def test_a_refused_upload_leaves_no_object_no_multipart_upload_and_no_row(
    api: TestClient, s3_server: S3Server, body: Any, status: int, code: str
) -> None:
    auth = new_key(_context(api), f"refused-{code}")
    s3 = _s3(s3_server)
    before = _keys(s3)
    answer = _post(api, auth, body())
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["code"] == code
    assert _keys(s3) == before
    assert s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads") is None
    assert api.get("/v1/datasets", headers=auth).json()["data"] == []


def test_an_image_dataset_is_a_few_shards_read_back_through_the_host_cache(
    api: TestClient, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    context = _context(api)
    pool, _ = digits_split()
    chosen = [item for item in pool if item[1] < 3][:30]
    archive = zip_of_classes(chosen)
    # Small shards, so that this small dataset needs several.
    monkeypatch.setattr("service.datasets.ingest.images.IMAGE_SHARD_BYTES", len(archive) // 3)
    auth = new_key(context, "shards")
    answer = api.post("/v1/datasets", headers=auth, files={"file": ("digits.zip", archive)})
    assert answer.status_code == 202, answer.text
    dataset_id = answer.json()["id"]
    process_upload(context=context, dataset_id=dataset_id)
    assert api.get(f"/v1/datasets/{dataset_id}", headers=auth).json()["status"] == "ready"

    stored = context.store.children(files_prefix(dataset_id))
    assert 2 <= len(stored) <= 4, stored
    assert all(name.startswith("images-") and name.endswith(".tar") for name in stored)
    items = dataset_items(context=context, dataset_id=dataset_id).items
    assert len(items) == len(chosen)
    # Ids are the manifest's sample paths, as before shards: experiments' test splits hold them.
    manifest = context.store.get_bytes(manifest_key(dataset_id)).decode()
    assert all(f'"path": "{item.id}"' in manifest for item in items)
    cache = context.settings.resolved_cache_dir / "entries"
    for item in items:
        content = Path(item.content)
        assert content.is_relative_to(cache)
        assert content.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Read again: the same cache entry, not a second download.
    again = dataset_items(context=context, dataset_id=dataset_id).items
    assert [item.content for item in again] == [item.content for item in items]


def test_a_dataset_stored_one_object_per_image_still_loads(api: TestClient) -> None:
    context = _context(api)
    pool, _ = digits_split()
    dataset_id = "ds_before_shards"
    samples = []
    for index, (image, label) in enumerate(pool[:6]):
        path = f"digit_{label % 2}/{index}.png"
        context.store.put_bytes(f"{files_prefix(dataset_id)}/{path}", png_bytes(image))
        samples.append({"path": path, "label": label % 2, "split": "train"})
    manifest = {
        "version": 2,
        "modality": "image",
        "classes": ["digit_0", "digit_1"],
        "samples": samples,
        "shards": [],
        "unlabelled": 0,
        "skipped": [],
        "class_counts": {},
    }
    context.store.put_bytes(manifest_key(dataset_id), json.dumps(manifest).encode())
    items = dataset_items(context=context, dataset_id=dataset_id).items
    assert [item.id for item in items] == [sample["path"] for sample in samples]
    assert all(Path(item.content).read_bytes()[:4] == b"\x89PNG" for item in items)
