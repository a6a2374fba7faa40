"""A dataset upload streams through the API into the object store: multipart, nothing on the
API's disk, and a refused upload leaves no object, no unfinished multipart upload and no row.
An image dataset is stored as a few shards, read back through the host cache; one stored
one object per image (manifest version 2) still loads. In-process API on S3 (moto_server in
its own process)."""

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from fastapi.testclient import TestClient

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
def api(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
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


def _files_on(folder: Path, larger_than: int) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and p.stat().st_size > larger_than]


def test_an_upload_streams_to_the_store_in_parts_and_never_lands_on_the_api_disk(
    api: TestClient, s3_server: S3Server
) -> None:
    context = _context(api)
    size = 2 * PART + 12345
    answer = _post(api, new_key(context, "streamer"), _body(size))
    assert answer.status_code == 202, answer.text
    dataset_id = answer.json()["id"]
    head = _s3(s3_server).head_object(Bucket=BUCKET, Key=f"{PREFIX}/{archive_key(dataset_id)}")
    assert head["ContentLength"] == size == answer.json()["upload_bytes"]
    assert str(head["ETag"]).strip('"').endswith("-3")  # published by a 3-part multipart upload
    # The API host kept nothing the size of a part (its SQLite database is small).
    assert _files_on(context.settings.data_dir, 2**20) == []


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
