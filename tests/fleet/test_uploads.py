"""A dataset upload streams through the API into the object store: multipart, nothing on the
API's disk, and a refused upload leaves no object, no unfinished multipart upload and no row.
In-process API on S3 (moto_server in its own process)."""

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from fastapi.testclient import TestClient

from service.cli import migrate_database
from service.context import AppContext
from service.datasets.service import archive_key
from service.settings import Settings
from tests.conftest import new_key
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
