"""Weights are never unpickled into code (item 12), and request bodies are capped while they
stream, with or without Content-Length (item 11)."""

import pickle
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from tests.processes import THAW, create_key, free_port, running, thaw_env, wait_ready
from worker.engine import WeightsUnavailableError, build_backbone


class _RunsCode:
    """Unpickling this calls Path.touch: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))


def test_a_pickle_in_the_weights_folder_never_runs(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    marker = tmp_path / "pwned"
    with (weights / "resnet18-f37072fd.pth").open("wb") as handle:
        pickle.dump({"conv1.weight": _RunsCode(marker)}, handle)
    torch.save({"x": _RunsCode(marker)}, weights / "resnet50-0676ba61.pth")
    assert not marker.exists()
    for name in ("resnet18", "resnet50"):
        # The refusal must say what to do, never echo torch's hint to disable weights_only.
        with pytest.raises(WeightsUnavailableError, match="plain tensors") as raised:
            build_backbone(name, pretrained=True, weights_dir=weights)
        assert not marker.exists(), f"loading {name} ran code from the weights file"
        assert "weights_only" not in str(raised.value)


UPLOAD_CAP = 256 * 1024
MULTIPART_HEAD = (
    b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.zip"\r\n'
    b"Content-Type: application/zip\r\n\r\n"
)


@dataclass
class UploadServer:
    host: str
    port: int
    key: str
    data_dir: Path


@pytest.fixture(scope="module")
def upload_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UploadServer]:
    """A real `thaw serve` with a small upload cap, reached over a socket: an in-process client
    would join a chunked body before the application sees any of it."""
    root = tmp_path_factory.mktemp("uploads")
    env = thaw_env(root / "data", THAW_MAX_UPLOAD_BYTES=str(UPLOAD_CAP))
    key = create_key(env, "uploader")["Authorization"].removeprefix("Bearer ")
    port = free_port()
    log = root / "serve.log"
    with running([*THAW, "serve", "--port", str(port)], env, log) as process:
        wait_ready(f"http://127.0.0.1:{port}", process, log)
        yield UploadServer(host="127.0.0.1", port=port, key=key, data_dir=root / "data")


def read_answer(sock: socket.socket) -> bytes:
    """The response's status line and headers, or whatever arrived before the server closed."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(65536)
        if not chunk:
            break
        answer += chunk
    return answer


@pytest.mark.parametrize("with_length", [True, False])
def test_oversized_upload_is_413_before_the_body_ends(
    upload_server: UploadServer, with_length: bool
) -> None:
    server = upload_server
    declared = 4 * UPLOAD_CAP
    headers = [
        "POST /v1/datasets HTTP/1.1",
        f"Host: {server.host}:{server.port}",
        f"Authorization: Bearer {server.key}",
        "Content-Type: multipart/form-data; boundary=b",
        # Without a length the body comes chunked: no Content-Length to trust.
        f"Content-Length: {declared}" if with_length else "Transfer-Encoding: chunked",
    ]
    piece = b"0" * (64 * 1024)
    with socket.create_connection((server.host, server.port), timeout=30) as sock:
        sock.sendall(("\r\n".join(headers) + "\r\n\r\n").encode())
        sent = 0
        # Twice the cap, then nothing more: the rest of the body (and, chunked, its final
        # empty chunk) never comes, so only a server that answers while streaming answers.
        for part in [MULTIPART_HEAD] + [piece] * (2 * UPLOAD_CAP // len(piece)):
            sock.sendall(part if with_length else b"%x\r\n%s\r\n" % (len(part), part))
            sent += len(part)
        assert sent < declared
        try:
            answer = read_answer(sock)
        except TimeoutError:
            pytest.fail("no answer while the body was unfinished: the server waits for its end")
    status_line = answer.split(b"\r\n", 1)[0]
    assert status_line == b"HTTP/1.1 413 Request Entity Too Large", answer[:500]

    scratch = server.data_dir / "tmp"
    assert not scratch.exists() or list(scratch.iterdir()) == [], "the partial upload was removed"
    # The upload streamed to the store: its unfinished object left nothing there either.
    uploads = server.data_dir / "artifacts" / "uploads"
    assert not uploads.exists() or list(uploads.rglob("*")) == [], list(uploads.rglob("*"))
    listed = httpx.get(
        f"http://{server.host}:{server.port}/v1/datasets",
        headers={"Authorization": f"Bearer {server.key}"},
    )
    assert listed.json()["data"] == []


def test_multipart_with_too_many_parts_is_refused(client: TestClient, auth: dict[str, str]) -> None:
    parts = b"".join(
        b'--b\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nx\r\n' % i for i in range(40)
    )
    response = client.post(
        "/v1/datasets",
        headers={**auth, "Content-Type": "multipart/form-data; boundary=b"},
        content=parts + b"--b--\r\n",
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "too_many_parts"
