"""Predict throughput and latency with dynamic batching on and off, over a real uvicorn server.

Trains a tiny model in-process into a temporary data folder, then starts `uvicorn` on
127.0.0.1 twice on that folder (batching as configured, then `THAW_BATCH_MAX_SIZE=1`) and drives
each with 32 concurrent clients sending one image per call.

    .venv/bin/python bench/inference.py [--clients 32] [--seconds 15]
"""

import argparse
import asyncio
import base64
import io
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from service.auth.service import create_key
from service.cli import migrate_database
from service.datasets.service import process_upload
from service.main import create_app
from service.settings import Settings
from worker import jobs

logger = logging.getLogger("bench.inference")


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def digits() -> list[tuple[np.ndarray, int]]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images * (255.0 / 16.0)).astype(np.uint8)
    return [(image, int(label)) for image, label in zip(images, data.target, strict=True)]


def train(data_dir: Path) -> str:
    """Publish `digits` v1 (3 classes, feature extraction) and return an API key."""
    settings = Settings(data_dir=data_dir, reaper_interval_seconds=3600)
    migrate_database(settings)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        kept = [item for item in digits() if item[1] < 3][:90]
        for index, (image, label) in enumerate(kept):
            archive.writestr(f"d/digit_{label}/{index:04d}.png", png(image))
    with TestClient(create_app(settings)) as client:
        context = client.app.state.context  # type: ignore[attr-defined]
        with context.db.session() as session:
            _, key = create_key(session, tenant_name="bench")
        auth = {"Authorization": f"Bearer {key}"}
        dataset = client.post(
            "/v1/datasets", headers=auth, files={"file": ("d.zip", buffer.getvalue())}
        ).json()
        process_upload(context=context, dataset_id=dataset["id"])
        spec = {
            "dataset": dataset["id"],
            "model": "digits",
            "base_model": "efficientnet_lite0",
            "strategy": "feature_extraction",
            "epochs": 1,
            "batch_size": 16,
            "image_size": 64,
        }
        job = client.post("/v1/jobs", headers=auth, json=spec).json()
        jobs.execute(context, job_id=job["id"])
        assert client.get(f"/v1/jobs/{job['id']}", headers=auth).json()["status"] == "succeeded"
    return str(key)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def drive(
    url: str, key: str, images: list[bytes], *, clients: int, seconds: float
) -> tuple[float, list[float], int]:
    """Requests per second, per-call latencies, and refused (non-200) calls."""
    headers = {"Authorization": f"Bearer {key}"}
    bodies = [
        {"images": [{"name": "x.png", "data": base64.b64encode(i).decode()}], "top_k": 1}
        for i in images
    ]
    latencies: list[float] = []
    refused = 0
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) as http:
        for body in bodies[:4]:  # loads and warms the model
            (await http.post("/v1/models/digits/versions/1/predict", json=body)).raise_for_status()
        stop = time.perf_counter() + seconds

        async def client(index: int) -> None:
            nonlocal refused
            n = index
            while time.perf_counter() < stop:
                started = time.perf_counter()
                response = await http.post(
                    "/v1/models/digits/versions/1/predict", json=bodies[n % len(bodies)]
                )
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    refused += 1
                n += clients

        began = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        elapsed = time.perf_counter() - began
    return len(latencies) / elapsed, latencies, refused


def serve_and_drive(
    data_dir: Path, key: str, images: list[bytes], env: dict[str, str], args: argparse.Namespace
) -> tuple[float, list[float], int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "service.main:create_app", "--factory",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        env={**os.environ, "THAW_DATA_DIR": str(data_dir),
             "THAW_REAPER_INTERVAL_SECONDS": "3600", **env},
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                httpx.get(f"{url}/healthz", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        return asyncio.run(drive(url, key, images, clients=args.clients, seconds=args.seconds))
    finally:
        process.terminate()
        process.wait(timeout=30)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="thaw-bench-") as folder:
        data_dir = Path(folder) / "data"
        key = train(data_dir)
        images = [png(image) for image, _ in digits()[-64:]]
        results = {}
        for label, env in (("batched", {}), ("unbatched", {"THAW_BATCH_MAX_SIZE": "1"})):
            rate, latencies, refused = serve_and_drive(data_dir, key, images, env, args)
            results[label] = rate
            logger.info(
                "%-9s %7.1f req/s  p50 %6.1f ms  p99 %6.1f ms  (%d calls, %d refused)",
                label,
                rate,
                1000 * percentile(latencies, 50),
                1000 * percentile(latencies, 99),
                len(latencies),
                refused,
            )
        logger.info(
            "throughput batched / unbatched: %.2fx (%d clients, %s)",
            results["batched"] / results["unbatched"],
            args.clients,
            {k: v for k, v in os.environ.items() if k.startswith("THAW_BATCH")} or "defaults",
        )


if __name__ == "__main__":
    main()
