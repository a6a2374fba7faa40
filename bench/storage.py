"""Dataset ingest and first epoch on the object store, divided by the same on the local folder.

Same machine, same archive, one run: for each backend, (a) ingest: the upload through the API
(`POST /v1/datasets`, streamed to the store) plus `process_upload` (the archive read back,
extracted, the images packed into tar shards and written to the store with the manifest), and
(b) first epoch: `load_manifest` (the shards come down and are extracted into the host cache)
plus one `fine_tune` epoch of the engine on them. The object store is an S3-compatible server
in its own process: moto_server, the one available here, a pure-Python server, so the figures
are an upper bound for MinIO or S3.

The first epoch runs the engine directly with its checkpoint in a temporary folder (the
worker's job path also uploads it to the store after the epoch; not measured here).

Run as `.venv/bin/python bench/storage.py [--images N] [--ddp-train N]`; it ends with bench/ddp.py's
one-process-against-two comparison (`--ddp-train 0` leaves it out).
"""

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
import httpx
import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from service.auth.service import create_key
from service.cli import migrate_database
from service.datasets.service import load_manifest, process_upload
from service.main import create_app
from service.settings import Settings
from worker.engine import Sample, TransferConfig, compile_plan, run

CLASSES = 4
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def archive(images: int) -> bytes:
    """A zip of one folder per class of noisy, tinted 64 px PNGs, as a user uploads."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        for index in range(images):
            label = index % CLASSES
            pixels = rng.integers(0, 200, size=(64, 64, 3)) + 50 * (np.arange(3) == label % 3)
            png = io.BytesIO()
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(png, format="PNG")
            zipped.writestr(f"class_{label}/{index:05d}.png", png.getvalue())
    return buffer.getvalue()


@contextmanager
def s3_server() -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    command = [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1"]
    process = subprocess.Popen(
        [*command, "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                httpx.get(f"{endpoint}/moto-api/", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=10)


def measure(settings: Settings, data: bytes) -> tuple[float, float]:
    """(ingest seconds, first-epoch seconds) on the store `settings` name."""
    migrate_database(settings)
    with TestClient(create_app(settings)) as client:
        context = client.app.state.context  # type: ignore[attr-defined]
        with context.db.session() as session:
            _, key = create_key(session, tenant_name="bench")
        began = time.perf_counter()
        answer = client.post(
            "/v1/datasets",
            headers={"Authorization": f"Bearer {key}"},
            files={"file": ("data.zip", data, "application/zip")},
        )
        answer.raise_for_status()
        dataset_id = answer.json()["id"]
        process_upload(context=context, dataset_id=dataset_id)
        ingest = time.perf_counter() - began

        began = time.perf_counter()
        manifest, root = load_manifest(context=context, dataset_id=dataset_id)
        samples = {
            split: [Sample(root / s.path, s.label) for s in manifest.samples if s.split == split]
            for split in ("train", "val")
        }
        plan = compile_plan(
            TransferConfig(
                base_model="efficientnet_lite0",
                num_classes=len(manifest.classes),
                strategy="fine_tune",
                epochs=1,
                batch_size=32,
                image_size=64,
                seed=0,
            )
        )
        with tempfile.TemporaryDirectory() as scratch:
            run(
                plan,
                train=samples["train"],
                val=samples["val"],
                classes=manifest.classes,
                weights_dir=context.settings.resolved_weights_dir,
                checkpoint_path=Path(scratch) / "checkpoint.pt",
            )
        return ingest, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument(
        "--ddp-train",
        type=int,
        default=480,
        help="training images of the DDP comparison (bench/ddp.py); 0 leaves it out",
    )
    args = parser.parse_args()
    os.environ.update(CREDENTIALS)
    data = archive(args.images)
    with tempfile.TemporaryDirectory() as root, s3_server() as endpoint:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        local = measure(Settings(data_dir=Path(root) / "local"), data)
        s3 = measure(
            Settings(
                data_dir=Path(root) / "s3",
                storage_url="s3://bench/thaw",
                s3_endpoint_url=endpoint,
            ),
            data,
        )
    print(f"{args.images} images of 64 px, {len(data) / 2**20:.1f} MiB archive")
    for name, index in (("ingest", 0), ("first epoch", 1)):
        ratio = s3[index] / local[index]
        print(f"{name:12} local {local[index]:6.2f} s  s3 {s3[index]:6.2f} s  s3/local {ratio:.2f}")
    if args.ddp_train:
        # One job on two processes against one process (the fleet issue's DDP figure).
        from ddp import report

        report(train_count=args.ddp_train, val_count=args.ddp_train // 2, threads=1)


if __name__ == "__main__":
    main()
