"""An S3-compatible server in its own process (moto's standalone server), as a fleet's MinIO
stands in a separate container: the store is reached over HTTP by a real boto3 client."""

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.processes import free_port

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "thaw-test",
    "AWS_SECRET_ACCESS_KEY": "thaw-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    log: Path
    """The server's request log (one line a request), for tests that count requests."""

    def requests_for(self, method: str, key: str) -> int:
        """How many `method` requests the server has logged for an object whose key ends with
        `key` (any query string: ranged and multipart parts count each)."""
        # The server logs a request once it has answered it: a marker request, answered after
        # every request made before this call, is awaited in the log first.
        marker = f"/moto-api/?mark={os.urandom(8).hex()}"
        httpx.get(f"{self.endpoint_url}{marker}", timeout=10)
        deadline = time.monotonic() + 10
        while marker not in (text := self.log.read_text(errors="replace")):
            assert time.monotonic() < deadline, f"{marker} never logged"
            time.sleep(0.01)
        pattern = re.compile(rf'"{method} /\S*{re.escape(key)}(\?\S*)? HTTP')
        plain = re.sub(r"\x1b\[[0-9;]*m", "", text)  # the log colours some status lines
        return sum(bool(pattern.search(line)) for line in plain.splitlines())

    def create_bucket(self, name: str) -> None:
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint_url, **_client_credentials())
        client.create_bucket(Bucket=name)

    def env(self, bucket: str, prefix: str = "thaw") -> dict[str, str]:
        """The variables a thaw process on a fleet host is given to use this store."""
        return {
            **CREDENTIALS,
            "THAW_STORAGE_URL": f"s3://{bucket}/{prefix}",
            "THAW_S3_ENDPOINT_URL": self.endpoint_url,
        }


def _client_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": CREDENTIALS["AWS_DEFAULT_REGION"],
    }


@contextmanager
def moto_server(log: Path) -> Iterator[S3Server]:
    """Start `moto_server` on a free local port, wait until it answers, stop it afterwards.
    Also sets the AWS credentials in this process's environment for the block."""
    port = free_port()
    command = [
        str(Path(sys.executable).with_name("moto_server")),
        "-H",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    saved = {name: os.environ.get(name) for name in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                pytest.fail(f"moto_server exited early:\n{log.read_text()[-2000:]}")
            try:
                httpx.get(f"{endpoint}/moto-api/", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    pytest.fail(f"moto_server not up after 30 s:\n{log.read_text()[-2000:]}")
                time.sleep(0.1)
        yield S3Server(endpoint_url=endpoint, log=log)
    finally:
        process.terminate()
        process.wait(timeout=10)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
