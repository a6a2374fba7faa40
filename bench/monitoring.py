"""Monitoring, measured: how often the shift test alarms on in-distribution traffic, how fast
and how often it sees three kinds of shift at two strengths, how close the accuracy estimated
without labels comes to the true accuracy on shifted traffic, and what recording costs predict.

Publishes `digits` v1 (EfficientNet-Lite0 at 64 px, 5 digit classes, 80 images each, feature
extraction, one epoch) through the real job path, so the version has the reference profile
the publisher writes. Windows are drawn (with replacement) from the digits of those classes
that were never uploaded, reduced by the served model (ONNX Runtime, its `features` output)
and tested by the service's own `window_statistics`, as the API tests a closed window:

- false alarms: the share of `--null-windows` in-distribution windows with `shifted: true`;
- per shift (pixel noise, rotation, lowered contrast; two strengths each): over `--streams`
  streams of `--shifted-windows` shifted windows, the mean number of windows until the first
  alarm (1: the first shifted window alarms) and the share of shifted windows that alarm
  (power), and the mean |estimated - observed accuracy| over them (observed: the true labels);
- predict throughput with monitoring on and off: `thaw api` (THAW_MONITOR true/false, one
  process) under the same load from `--clients` keep-alive httpx clients, rounds alternated,
  the best of each; req/s and answers per second of the server's CPU.

    .venv/bin/python bench/monitoring.py [--window 50] [--null-windows 200] [--seconds 5]
"""

import argparse
import io
import logging
import os
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from fastapi.testclient import TestClient
from inference import cpu_seconds, digits, png, server
from PIL import Image

from service.auth.service import create_key
from service.cli import migrate_database
from service.datasets.ingest import IngestLimits
from service.datasets.service import process_upload
from service.inference.resolution import ServedVersion
from service.inference.service import ItemReader, load_model
from service.main import create_app
from service.monitoring.reference import REFERENCE_FILE, Reference, summarise
from service.monitoring.service import window_statistics
from service.settings import Settings
from service.tables import ModelVersion, MonitorPrediction
from worker import jobs

logger = logging.getLogger("bench.monitoring")

CLASSES = 5
PREDICT = "/v1/models/digits/versions/1/predict"
UPLOADED = 80


def publish(data_dir: Path) -> tuple[str, Path, ServedVersion]:
    settings = Settings(data_dir=data_dir, reaper_interval_seconds=3600)
    migrate_database(settings)
    buffer = io.BytesIO()
    seen: dict[int, int] = {}
    with zipfile.ZipFile(buffer, "w") as archive:
        for index, (image, label) in enumerate(digits()):
            if label < CLASSES and seen.get(label, 0) < UPLOADED:
                seen[label] = seen.get(label, 0) + 1
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
        with context.db.session() as session:
            version = session.query(ModelVersion).filter_by(job_id=job["id"]).one()
            assert version.exports["monitoring"]["reference"], version.exports
            folder = context.store.local_path(version.artifact_prefix)
            served = ServedVersion.of(version)
    return str(key), folder, served


def unseen() -> list[tuple[np.ndarray, int]]:
    seen: dict[int, int] = {}
    kept = []
    for image, label in digits():
        if label < CLASSES:
            seen[label] = seen.get(label, 0) + 1
            if seen[label] > UPLOADED:
                kept.append((image, label))
    return kept


def noise(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    noisy = image.astype(np.float64) + rng.normal(0, strength, image.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def rotation(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(Image.fromarray(image).rotate(strength, resample=Image.Resampling.BILINEAR))


def contrast(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    lowered = image.astype(np.float64) * strength + 128 * (1 - strength)
    return lowered.astype(np.uint8)


SHIFTS = {
    "pixel noise": (noise, (8.0, 24.0), "sd {:g}"),
    "rotation": (rotation, (5.0, 20.0), "{:g} deg"),
    "contrast": (contrast, (0.9, 0.6), "x{:g}"),
}


class Traffic:
    """Every image's prediction as the recorder keeps it (reduced features, confidence,
    predicted label) and whether it was right."""

    def __init__(self, model: Any, reference: Reference, images: list[tuple[np.ndarray, int]]):
        named: list[tuple[str, bytes | None]] = [
            (f"{i}.png", png(image)) for i, (image, _) in enumerate(images)
        ]
        reading = ItemReader(IngestLimits(), max_text_chars=0)
        _, good, pixels = model.inputs.prepare(named, reading)
        assert len(good) == len(images)
        summary = summarise(model, model.forward(model.batch_input([pixels])))
        assert summary.features is not None
        self.features = reference.projection(summary.features)
        self.confidences = summary.probabilities.max(axis=1)
        predicted = summary.probabilities.argmax(axis=1)
        self.predicted = [reference.labels[i] for i in predicted]
        self.correct = predicted == np.array([label for _, label in images])

    def window(self, rng: np.random.Generator, size: int) -> tuple[list[MonitorPrediction], float]:
        chosen = rng.integers(0, len(self.confidences), size)
        rows = [
            MonitorPrediction(
                predicted=self.predicted[i],
                confidence=float(self.confidences[i]),
                features=self.features[i].tobytes(),
            )
            for i in chosen
        ]
        return rows, float(self.correct[chosen].mean())


def statistics_table(args: argparse.Namespace, model: Any, reference: Reference) -> None:
    rng = np.random.default_rng(args.seed)
    images = unseen()
    calm = Traffic(model, reference, images)
    alarms = 0
    estimate_errors = []
    for seed in range(args.null_windows):
        rows, observed = calm.window(rng, args.window)
        result = window_statistics(rows, reference, seed=seed)
        alarms += bool(result["shifted"])
        estimate_errors.append(abs(result["estimated_accuracy"] - observed))
    print(
        f"reference: {len(reference.features)} validation rows, {reference.features.shape[1]} dims,"
    )
    estimated = reference.expected_accuracy
    print(f"  validation accuracy {reference.accuracy:.3f}, estimated {estimated:.3f}")
    print(f"window: {args.window} predictions; significance 0.01")
    print(
        f"false alarms: {alarms}/{args.null_windows} in-distribution windows "
        f"= {alarms / args.null_windows:.3f} (target <= 0.02); "
        f"|estimated - observed| {np.mean(estimate_errors):.3f}"
    )
    print()
    print("| shift | strength | accuracy | delay (windows) | power | |est - obs| |")
    print("|---|---|---|---|---|---|")
    for name, (apply, strengths, form) in SHIFTS.items():
        for strength in strengths:
            shifted = Traffic(
                model, reference, [(apply(image, strength, rng), label) for image, label in images]
            )
            delays, alarmed, errors = [], 0, []
            for stream in range(args.streams):
                first = None
                for index in range(args.shifted_windows):
                    rows, observed = shifted.window(rng, args.window)
                    seed = 10_000 + stream * 100 + index
                    result = window_statistics(rows, reference, seed=seed)
                    errors.append(abs(result["estimated_accuracy"] - observed))
                    if result["shifted"]:
                        alarmed += 1
                        first = first or index + 1
                delays.append(first if first is not None else args.shifted_windows + 1)
            total = args.streams * args.shifted_windows
            print(
                f"| {name} | {form.format(strength)} | {shifted.correct.mean():.3f} | "
                f"{np.mean(delays):.2f} | {alarmed / total:.2f} | {np.mean(errors):.3f} |"
            )


def load(
    url: str, key: str, body: bytes, args: argparse.Namespace, pid: int
) -> tuple[float, float]:
    """Answers per second, and per second of the server's CPU, under `args.clients` clients."""
    headers = {"Authorization": f"Bearer {key}"}
    files = {"images": ("a.png", body)}
    httpx.post(f"{url}{PREDICT}", headers=headers, files=files, timeout=120).raise_for_status()
    answered = [0]
    lock = threading.Lock()
    stop = time.monotonic() + args.seconds

    def client() -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
            while time.monotonic() < stop:
                if http.post(PREDICT, files=files).status_code == 200:
                    with lock:
                        answered[0] += 1

    cpu_before = cpu_seconds(pid)
    started = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    cpu = cpu_seconds(pid) - cpu_before
    return answered[0] / elapsed, answered[0] / max(cpu, 1e-9)


def throughput(args: argparse.Namespace, data_dir: Path, key: str) -> None:
    body = png(unseen()[0][0])
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.rounds):
        for monitor in ("false", "true"):
            env = {
                "THAW_DATA_DIR": str(data_dir),
                "THAW_MONITOR": monitor,
                "THAW_API_PROCESSES": "1",
            }
            with server("thaw", argparse.Namespace(processes=1), env) as (url, pid):
                rate, per_cpu = load(url, key, body, args, pid)
            previous = best.get(monitor, (0.0, 0.0))
            best[monitor] = (max(previous[0], rate), max(previous[1], per_cpu))
    on, off = best["true"], best["false"]
    print()
    print(f"predict, one PNG per call, {args.clients} clients, best of {args.rounds} rounds:")
    print(f"  monitoring off: {off[0]:7.1f} req/s  {off[1]:6.1f} answers/cpu-s")
    print(f"  monitoring on:  {on[0]:7.1f} req/s  {on[1]:6.1f} answers/cpu-s")
    print(
        f"  on / off: {on[0] / off[0]:.3f} req/s, {on[1] / off[1]:.3f} per cpu-s (target >= 0.95)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--null-windows", type=int, default=200)
    parser.add_argument("--streams", type=int, default=5)
    parser.add_argument("--shifted-windows", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("THAW_TORCH_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="thaw-bench-monitoring-") as scratch:
        data_dir = Path(scratch) / "data"
        key, folder, served = publish(data_dir)
        model = load_model(folder, version=served, backend="onnx", threads=1)
        reference = Reference.load(folder / REFERENCE_FILE)
        statistics_table(args, model, reference)
        throughput(args, data_dir, key)


if __name__ == "__main__":
    main()
