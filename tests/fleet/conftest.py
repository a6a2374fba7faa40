"""Fleet tests: thaw's processes as separate "hosts" (each its own data and cache folder, no
folder in common) sharing only Postgres, Redis and an S3-compatible server in its own process."""

from collections.abc import Iterator

import pytest

from tests.fleet.s3server import S3Server, moto_server


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server
