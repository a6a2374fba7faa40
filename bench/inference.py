"""How close predict comes to the limit of this machine: the HTTP floor and the raw model.

Trains a tiny EfficientNet-Lite0 model at 64 px (the embedded default weights, 3 digit classes,
one epoch) into a temporary data folder through the real job path, so it runs on a fresh clone
and the model has the `model.onnx` the publisher exports. Then, in one run, it prints:

- the raw model's throughput in PyTorch (plain, `inference_mode`, channels-last, and
  `torch.compile` with `--compile`) and in ONNX Runtime (1 and all intra-op threads), at batch 1
  and 32, measured in this process;
- a bare FastAPI endpoint's req/s (the HTTP floor) and thaw's `/healthz` req/s, each from its own
  uvicorn process started exactly like thaw's;
- predict req/s with p50/p99, dynamic batching on and off (`THAW_BATCH_MAX_SIZE=1`), one small
  PNG per multipart call, and an overload run against a small queue (503s, p99);
- the figure that counts: predict ÷ min(HTTP floor, raw ONNX Runtime at batch 32).

The load comes from `wrk` (Debian: `apt-get install wrk`), a C load generator in its own
process, with a Lua script for the multipart body. `--profile DIR` also records the batched
predict run with py-spy (a dev dependency) and prints where the server's time went.

    .venv/bin/python bench/inference.py [--connections 32] [--seconds 10] [--profile DIR]

The machine is shared: compare figures within one run, and run again if one looks disturbed.
"""

import argparse
import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from service.auth.service import create_key
from service.cli import migrate_database
from service.datasets.service import process_upload
from service.inference.service import onnx_session
from service.main import create_app
from service.settings import Settings
from service.tables import ModelVersion
from worker import jobs
from worker.engine import Predictor
from worker.engine.artifacts import ONNX_FILE, ONNX_INPUT, ONNX_OUTPUT

logger = logging.getLogger("bench.inference")

PREDICT_PATH = "/v1/models/digits/versions/1/predict"
BOUNDARY = "thawbenchboundary"
# Reports one machine-readable line at the end of a wrk run (latencies in microseconds).
WRK_REPORT = """
done = function(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format("THAW-WRK %d %d %d %d %d %d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), errors.status,
    errors.connect + errors.read + errors.write + errors.timeout))
end
"""


def bare_app() -> FastAPI:
    """The HTTP floor: the least a FastAPI endpoint can do, served like thaw."""
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def digits() -> list[tuple[np.ndarray, int]]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images * (255.0 / 16.0)).astype(np.uint8)
    return [(image, int(label)) for image, label in zip(images, data.target, strict=True)]


def train(data_dir: Path) -> tuple[str, Path]:
    """Publish `digits` v1 (3 classes, feature extraction); an API key and the model folder."""
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
        with context.db.session() as session:
            version = session.query(ModelVersion).one()
            assert version.exports["onnx"]["exported"], version.exports
            model_dir = context.store.local_path(version.artifact_prefix)
    return str(key), model_dir


# --- the raw model --------------------------------------------------------------------------


def images_per_second(forward: Callable[[], object], batch: int, seconds: float) -> float:
    for _ in range(3):
        forward()
    count = 0
    began = time.perf_counter()
    while (elapsed := time.perf_counter() - began) < seconds:
        forward()
        count += batch
    return count / elapsed


def raw_model(model_dir: Path, seconds: float, *, compile_model: bool) -> dict[str, float]:
    """Images/s per backend, variant, thread count and batch size, in this process."""
    predictor = Predictor.load(model_dir)
    module = predictor.model.eval()
    size = predictor.exported.preprocessing.image_size
    results: dict[str, float] = {}
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        session = onnx_session(model_dir / ONNX_FILE, threads)
        for batch in (1, 32):
            inputs = torch.randn(batch, 3, size, size)
            last = inputs.contiguous(memory_format=torch.channels_last)

            def plain(inputs: torch.Tensor = inputs) -> object:
                with torch.no_grad():
                    return module.forward_tasks(inputs)

            def inference_mode(inputs: torch.Tensor = inputs) -> object:
                with torch.inference_mode():
                    return module.forward_tasks(inputs)

            ort = partial(session.run, [ONNX_OUTPUT], {ONNX_INPUT: inputs.numpy()})

            tag = f"{threads}t b{batch:<2}"
            results[f"torch no_grad        {tag}"] = images_per_second(plain, batch, seconds)
            results[f"torch inference_mode {tag}"] = images_per_second(
                inference_mode, batch, seconds
            )
            module.to(memory_format=torch.channels_last)
            results[f"torch channels_last  {tag}"] = images_per_second(
                lambda last=last: inference_mode(last), batch, seconds
            )
            module.to(memory_format=torch.contiguous_format)
            results[f"onnxruntime          {tag}"] = images_per_second(ort, batch, seconds)
    if compile_model:
        started = time.perf_counter()
        compiled = torch.compile(module)
        for batch in (1, 32):
            inputs = torch.randn(batch, 3, size, size)

            def run_compiled(inputs: torch.Tensor = inputs) -> object:
                with torch.inference_mode():
                    return compiled(inputs)

            results[f"torch.compile        {torch.get_num_threads()}t b{batch:<2}"] = (
                images_per_second(run_compiled, batch, seconds)
            )
        logger.info(
            "  (torch.compile: %.0f s including compilation)", time.perf_counter() - started
        )
    return results


# --- servers and load ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def server(app: str, args: argparse.Namespace, env: dict[str, str]) -> Iterator[tuple[str, int]]:
    """A uvicorn process serving `app` (a factory), as thaw's Dockerfile starts it."""
    port = free_port()
    command = [
        sys.executable, "-m", "uvicorn", app, "--factory", "--host", "127.0.0.1",
        "--port", str(port), "--log-level", "warning", "--no-access-log",
        "--loop", args.loop, "--http", args.http, "--workers", str(args.workers),
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **env},
        cwd=Path(__file__).parent,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                httpx.get(f"{url}/healthz", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if process.poll() is not None:
                    raise RuntimeError(f"{app} exited with {process.returncode}") from None
                time.sleep(0.1)
        yield url, process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Load:
    rate: float
    p50_ms: float
    p99_ms: float
    requests: int
    refused: int
    """Answers other than 2xx/3xx."""
    failed: int
    """Connect, read, write errors and timeouts."""

    def __str__(self) -> str:
        return (
            f"{self.rate:8.1f} req/s  p50 {self.p50_ms:7.1f} ms  p99 {self.p99_ms:7.1f} ms  "
            f"({self.requests} calls, {self.refused} non-2xx, {self.failed} socket errors)"
        )


def wrk(url: str, script: str, args: argparse.Namespace, *, connections: int) -> Load:
    folder = Path(args.scratch)
    lua = folder / f"load-{time.monotonic_ns()}.lua"
    lua.write_text(script + WRK_REPORT)
    command = ["wrk", "-t", "1", "-c", str(connections), "-d", f"{args.seconds:g}s"]
    command += ["--timeout", "10s", "-s", str(lua), url]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    match = re.search(r"THAW-WRK (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)", out)
    if match is None:
        raise RuntimeError(f"wrk printed no report:\n{out}")
    requests, duration_us, p50, p99, status, failed = (int(g) for g in match.groups())
    return Load(requests / (duration_us / 1e6), p50 / 1000, p99 / 1000, requests, status, failed)


def histogram_p99(exposition: str, name: str) -> tuple[int, float]:
    """A Prometheus histogram's count and the upper bound of the bucket holding its p99."""
    buckets = [
        (float(bound), float(count))
        for bound, count in re.findall(
            rf'^{name}_bucket\{{[^}}]*le="([^"]+)"[^}}]*\}} (\S+)', exposition, re.M
        )
    ]
    total = buckets[-1][1] if buckets else 0.0
    bound = next((b for b, count in buckets if count >= 0.99 * total), float("inf"))
    return int(total), bound


def predict_script(body_path: Path, key: str) -> str:
    return f"""
local file = assert(io.open({json.dumps(str(body_path))}, "rb"))
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = "multipart/form-data; boundary={BOUNDARY}"
wrk.headers["Authorization"] = "Bearer {key}"
"""


def multipart_body(image: bytes) -> bytes:
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; filename="x.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


@contextmanager
def profiled(pid: int, args: argparse.Namespace) -> Iterator[None]:
    """py-spy samples the server (all threads, native frames off) while the load runs."""
    if not args.profile:
        yield
        return
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "predict.collapsed"
    spy = subprocess.Popen(
        ["py-spy", "record", "--pid", str(pid), "--duration", f"{args.seconds:g}",
         "--rate", "200", "--subprocesses", "--format", "raw", "--output", str(raw)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield
    finally:
        spy.wait(timeout=args.seconds + 60)
    report_profile(raw)


def report_profile(raw: Path) -> None:
    """Per function, the share of the server's busy samples in which it is on the stack."""
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        # An idle thread waits in a lock, select or queue: its samples show no work.
        if any(idle in frames[-1] for idle in ("wait (", "select (", "_worker (", "get (")):
            continue
        samples = int(count)
        total += samples
        for frame in set(frames):
            inclusive[frame] += samples
    logger.info("profile: %d busy samples; functions on >= 3 %% of them (inclusive):", total)
    for frame, samples in inclusive.most_common(60):
        if samples / total >= 0.03 and not frame.startswith(("<module>", "run (", "_bootstrap")):
            logger.info("  %5.1f %%  %s", 100 * samples / total, frame)
    logger.info("  (collapsed stacks: %s)", raw)


# --- the run ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0, help="per load run")
    parser.add_argument("--rounds", type=int, default=3, help="turns each load takes")
    parser.add_argument("--raw-seconds", type=float, default=2.0, help="per raw-model figure")
    parser.add_argument("--loop", default="auto", help="uvicorn --loop (auto picks uvloop)")
    parser.add_argument("--http", default="auto", help="uvicorn --http (auto picks httptools)")
    parser.add_argument("--workers", type=int, default=1, help="API processes (uvicorn)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time torch.compile (about 4 minutes of compiling on 2 busy cores)",
    )
    parser.add_argument("--profile", help="folder for a py-spy profile of the predict run")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("bench/inference.py needs wrk: apt-get install wrk")
    if args.profile and shutil.which("py-spy") is None:
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="thaw-bench-") as folder:
        args.scratch = folder
        data_dir = Path(folder) / "data"
        key, model_dir = train(data_dir)
        image = png(digits()[-1][0])
        body_path = Path(folder) / "predict-body"
        body_path.write_bytes(multipart_body(image))
        thaw_env = {
            "THAW_DATA_DIR": str(data_dir),
            "THAW_REAPER_INTERVAL_SECONDS": "3600",
            # The bench's one key would otherwise be throttled at 20 req/s.
            "THAW_RATE_LIMIT_PER_MINUTE": "0",
        }
        logger.info(
            "EfficientNet-Lite0, 64 px, %d cores, %d connections, %d rounds of %g s per load, "
            "uvicorn --loop %s --http %s --workers %d",
            os.cpu_count(),
            args.connections,
            args.rounds,
            args.seconds,
            args.loop,
            args.http,
            args.workers,
        )
        logger.info("raw model, images/s (this process; t = threads):")
        raw = raw_model(model_dir, args.raw_seconds, compile_model=args.compile)
        for name, rate in raw.items():
            logger.info("  %s %8.1f", name, rate)
        raw_ort = max(rate for name, rate in raw.items() if "onnxruntime" in name and "b32" in name)

        get = 'wrk.method = "GET"\nwrk.path = "/healthz"\n'
        post = predict_script(body_path, key)
        thaw = "service.main:create_app"
        unbatched_env = {**thaw_env, "THAW_BATCH_MAX_SIZE": "1"}
        loads: dict[str, list[Load]] = {}
        # All servers stay up (idle ones cost nothing) and the loads take turns, round after
        # round, so a neighbour's burst on this shared machine disturbs every figure alike.
        with (
            server("inference:bare_app", args, {}) as (bare_url, _),
            server(thaw, args, thaw_env) as (batched_url, batched_pid),
            server(thaw, args, unbatched_env) as (unbatched_url, _),
        ):
            for url in (batched_url, unbatched_url):
                warm_up(url, key, image)
            served_by = re.findall(
                r'thaw_inference_backend\{[^}]*backend="(\w+)"[^}]*reason="([^"]*)"',
                httpx.get(f"{batched_url}/metrics").text,
            )
            for round_number in range(args.rounds):
                runs: list[tuple[str, str, str]] = [
                    ("bare FastAPI GET", bare_url, get),
                    ("thaw /healthz", batched_url, get),
                    ("predict batched", f"{batched_url}{PREDICT_PATH}", post),
                    ("predict unbatched", f"{unbatched_url}{PREDICT_PATH}", post),
                ]
                for label, url, script in runs:
                    profiling = round_number == 0 and label == "predict batched"
                    with profiled(batched_pid, args) if profiling else _nothing():
                        load = wrk(url, script, args, connections=args.connections)
                    loads.setdefault(label, []).append(load)
                    logger.info("%-18s %s", label, load)
        # Eight times the connections, against an admission limit of twice them: the refused
        # calls are answered 503 at once, the accepted ones keep a bounded latency.
        limit = 2 * args.connections
        overload_env = {**thaw_env, "THAW_PREDICT_MAX_IN_FLIGHT": str(limit)}
        with server(thaw, args, overload_env) as (url, _):
            warm_up(url, key, image)
            overload = wrk(f"{url}{PREDICT_PATH}", post, args, connections=8 * args.connections)
            metrics = httpx.get(f"{url}/metrics").text
        accepted, accepted_p99 = histogram_p99(metrics, "thaw_predict_request_seconds")
        logger.info(
            "overload (%d connections, at most %d in flight) %s",
            8 * args.connections,
            limit,
            overload,
        )
        logger.info(
            "  accepted %d calls, p99 <= %g ms in the server (thaw_predict_request_seconds)",
            accepted,
            1000 * accepted_p99,
        )
        logger.info("  (wrk's p50/p99 are of every call, the refused ones included)")

        # The fastest round is the one the neighbours disturbed least.
        best = {label: max(runs, key=lambda load: load.rate) for label, runs in loads.items()}
        logger.info("fastest round of each:")
        for label, load in best.items():
            logger.info("  %-18s %s", label, load)
        batched, bare = best["predict batched"], best["bare FastAPI GET"]
        logger.info("served by: %s", served_by or "(not reported)")
        logger.info(
            "predict / min(HTTP floor %.0f, raw ORT b32 %.0f) = %.2f   (target >= 0.5)",
            bare.rate,
            raw_ort,
            batched.rate / min(bare.rate, raw_ort),
        )
        logger.info(
            "batched / unbatched = %.2fx   (target >= 3)",
            batched.rate / best["predict unbatched"].rate,
        )
        logger.info("p99 / p50 batched = %.2f   (target <= 3)", batched.p99_ms / batched.p50_ms)
        logger.info(
            "healthz / bare = %.2f   (target >= 0.8)", best["thaw /healthz"].rate / bare.rate
        )


def warm_up(url: str, key: str, image: bytes) -> None:
    """One call loads the model, so no load run pays for it."""
    httpx.post(
        f"{url}{PREDICT_PATH}",
        headers={"Authorization": f"Bearer {key}"},
        files=[("images", ("x.png", image))],
        timeout=120,
    ).raise_for_status()


@contextmanager
def _nothing() -> Iterator[None]:
    yield


if __name__ == "__main__":
    main()
