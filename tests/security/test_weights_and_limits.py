"""Weights are never unpickled into code (item 12), and request bodies are capped while they
stream, with or without Content-Length (item 11)."""

import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from service.context import AppContext
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


def _chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    head = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.zip"\r\n'
        b"Content-Type: application/zip\r\n\r\n"
    )
    yield head
    sent = 0
    while sent < total:
        yield b"0" * size
        sent += size
    yield b"\r\n--b--\r\n"


@pytest.mark.parametrize("with_length", [True, False])
def test_oversized_upload_is_413_while_streaming(
    client: TestClient, context: AppContext, auth: dict[str, str], with_length: bool
) -> None:
    context.settings.max_upload_bytes = 256 * 1024
    headers = {**auth, "Content-Type": "multipart/form-data; boundary=b"}
    # Without a length the client sends it chunked: no Content-Length to trust.
    body = b"".join(_chunks(1024 * 1024)) if with_length else _chunks(1024 * 1024)
    response = client.post("/v1/datasets", headers=headers, content=body)
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "upload_too_large"
    assert list(Path(context.scratch_dir).iterdir()) == [], "the partial upload was removed"
    assert client.get("/v1/datasets", headers=auth).json()["data"] == []


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
