"""How close predict comes to the limit of this machine: the HTTP floor and the raw model.

Trains a tiny EfficientNet-Lite0 model at 64 px (the embedded default weights, 3 digit classes,
one epoch) into a temporary data folder through the real job path, so it runs on a fresh clone
and the model has the `model.onnx` the publisher exports. Then, in one run, it prints:

- the raw model's throughput in PyTorch (plain, `inference_mode`, channels-last, and
  `torch.compile` with `--compile`) and in ONNX Runtime (1 and all intra-op threads), at batch 1
  and 32, measured in this process, per second and per second of its CPU; and the image model
  in ONNX Runtime at the server's thread count from batch 1 to 64 (the model's own batch gain);
- a bare FastAPI endpoint's req/s (the HTTP floor), from uvicorn in as many processes as thaw's,
  and thaw's `/healthz` req/s; thaw runs as its Dockerfile runs it, `thaw api`, in
  `THAW_API_PROCESSES` processes (`--processes`, default thaw's: one per core), and once more in
  one process for comparison;
- predict req/s with p50/p99 and answers per second of the server's CPU (its processes' CPU
  time over the run, so a figure does not hang on the share of the host the scheduler gave the
  server), dynamic batching on and off (`THAW_BATCH_MAX_SIZE=1`), one small
  PNG per multipart call, and the same for a text model: a minilm_l6 model trained the same way
  (feature extraction, one epoch, on 60 Debian package descriptions, `max_length` 32; it
  measures speed, not accuracy), one description per JSON `{"texts": [...]}` call;
- the Open Inference Protocol's binary path (`POST /v2/models/digits/versions/1/infer`, a
  preprocessed `(B, 3, 64, 64)` float32 tensor after the JSON header, straight to the batcher):
  calls/s with 1 and 32 images per call, beside predict and the raw model in ONNX Runtime;
- where an accepted call's time went in the server (queue wait, forward pass, whole call, from
  its Prometheus histograms), and an overload run at 8x the connections (503s, p99);
- with `--sweep`, batched predict for several batcher settings (`THAW_BATCH_MAX_SIZE`,
  `THAW_BATCH_MAX_DELAY_MS`), which is where the defaults come from;
- the figures that count: predict ÷ min(HTTP floor, raw ONNX Runtime at batch 32, at any thread
  count, the fastest of the rounds: it is measured again before each round), and batched ÷
  unbatched, per second and per second of the server's CPU, beside the model's own batch gain
  (its cheapest batch up to `THAW_BATCH_MAX_SIZE` ÷ batch 1, images per CPU-second), the most
  batching can give where the CPU is the limit.

The load comes from `wrk` (Debian: `apt-get install wrk`), a C load generator in its own
process, with a Lua script for the multipart body. `--profile DIR` also records the batched
image and text predict runs with py-spy (a dev dependency) and prints where the server's time
went, per function and per part of a call (key check, body parsing, decoding, forward pass...)
in CPU-ms per answer.

    .venv/bin/python bench/inference.py [--connections 32] [--seconds 5] [--rounds 3]
        [--processes N] [--compile] [--sweep] [--profile DIR]

The machine is shared: compare figures within one run (the load average is printed at the start
and the end), and run again if one looks disturbed.
"""

import argparse
import csv
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
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
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
from worker.engine.artifacts import (
    ONNX_FILE,
    ONNX_INPUT,
    ONNX_OUTPUT,
    ONNX_TEXT_INPUTS,
    read_model_config,
)
from worker.engine.modalities.image.exported import ExportedImagePreprocessing
from worker.engine.modalities.text.exported import ExportedTextPreprocessing
from worker.engine.modalities.text.tokens import SpecialTokens, encode, load_backend, pad

logger = logging.getLogger("bench.inference")

PREDICT_PATH = "/v1/models/digits/versions/1/predict"
OIP_PATH = "/v2/models/digits/versions/1/infer"
OIP_BATCHES = (1, 32)
TEXT_PREDICT_PATH = "/v1/models/sections/versions/1/predict"
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


TEXT_FIXTURE = Path(__file__).parent.parent / "tests" / "fixtures" / "debian_descriptions.csv"
TEXT_PER_CLASS = 10


def descriptions() -> list[dict[str, str]]:
    """The Debian descriptions fixture's rows: `text`, `label`."""
    with TEXT_FIXTURE.open(encoding="utf-8") as file:
        return list(csv.DictReader(file))


def text_upload() -> bytes:
    """The first `TEXT_PER_CLASS` descriptions of each section, as a CSV upload."""
    taken: Counter[str] = Counter()
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["text", "label"])
    for row in descriptions():
        if taken[row["label"]] < TEXT_PER_CLASS:
            taken[row["label"]] += 1
            writer.writerow([row["text"], row["label"]])
    return out.getvalue().encode()


@dataclass
class Trained:
    key: str
    image_dir: Path
    """`digits` v1: EfficientNet-Lite0 at 64 px."""
    text_dir: Path
    """`sections` v1: minilm_l6, max_length 32."""


def train(data_dir: Path) -> Trained:
    """Publish `digits` v1 (3 classes) and `sections` v1 (a text model) by feature extraction,
    one epoch each, through the real job path."""
    settings = Settings(data_dir=data_dir, reaper_interval_seconds=3600)
    migrate_database(settings)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        kept = [item for item in digits() if item[1] < 3][:90]
        for index, (image, label) in enumerate(kept):
            archive.writestr(f"d/digit_{label}/{index:04d}.png", png(image))
    uploads = {
        "digits": (
            ("d.zip", buffer.getvalue()),
            {"base_model": "efficientnet_lite0", "image_size": 64},
        ),
        "sections": (("s.csv", text_upload()), {"base_model": "minilm_l6", "max_length": 32}),
    }
    folders: dict[str, Path] = {}
    with TestClient(create_app(settings)) as client:
        context = client.app.state.context  # type: ignore[attr-defined]
        with context.db.session() as session:
            _, key = create_key(session, tenant_name="bench")
        auth = {"Authorization": f"Bearer {key}"}
        for model, (upload, model_spec) in uploads.items():
            dataset = client.post("/v1/datasets", headers=auth, files={"file": upload}).json()
            process_upload(context=context, dataset_id=dataset["id"])
            spec = {
                "dataset": dataset["id"],
                "model": model,
                "strategy": "feature_extraction",
                "epochs": 1,
                "batch_size": 16,
                **model_spec,
            }
            job = client.post("/v1/jobs", headers=auth, json=spec).json()
            jobs.execute(context, job_id=job["id"])
            done = client.get(f"/v1/jobs/{job['id']}", headers=auth).json()
            assert done["status"] == "succeeded", done
            with context.db.session() as session:
                version = session.query(ModelVersion).filter_by(job_id=job["id"]).one()
                assert version.exports["onnx"]["exported"], version.exports
                folders[model] = context.store.local_path(version.artifact_prefix)
    return Trained(str(key), folders["digits"], folders["sections"])


# --- the raw model --------------------------------------------------------------------------


@dataclass
class Rate:
    wall: float
    """Inputs per second."""
    cpu: float
    """Inputs per second of this process's CPU time: what an input costs, whatever share of
    the shared cores the scheduler gave the run."""

    def __str__(self) -> str:
        return f"{self.wall:8.1f} /s  {self.cpu:8.1f} /cpu-s"


def images_per_second(forward: Callable[[], object], batch: int, seconds: float) -> Rate:
    for _ in range(3):
        forward()
    count = 0
    began, cpu_began = time.perf_counter(), time.process_time()
    while (elapsed := time.perf_counter() - began) < seconds:
        forward()
        count += batch
    return Rate(count / elapsed, count / max(time.process_time() - cpu_began, 1e-9))


def thread_counts() -> list[int]:
    """One thread, the server's default (`THAW_INFERENCE_THREADS`), and all cores (ONNX
    Runtime; torch at the server's count only)."""
    cores = os.cpu_count() or 1
    return sorted({1, Settings().resolved_inference_threads, cores})


def raw_model(model_dir: Path, seconds: float, *, compile_model: bool) -> dict[str, Rate]:
    """Images/s per backend, variant, thread count and batch size, in this process."""
    predictor = Predictor.load(model_dir)
    module = predictor.model.eval()
    size = ExportedImagePreprocessing.of(read_model_config(model_dir)).image_size
    results = raw_onnx(model_dir, seconds)
    # torch at the server's thread count only: with more, on a shared host its spinning
    # threads ran at 0.3-5 images/s, minutes per figure.
    threads = Settings().resolved_inference_threads
    torch.set_num_threads(threads)

    def inference_mode(inputs: torch.Tensor) -> object:
        with torch.inference_mode():
            return module.forward_tasks(inputs)

    def plain(inputs: torch.Tensor) -> object:
        with torch.no_grad():
            return module.forward_tasks(inputs)

    for batch in (1, 32):
        inputs = torch.randn(batch, 3, size, size)
        tag = f"{threads}t b{batch:<2}"
        results[f"torch no_grad        {tag}"] = images_per_second(
            partial(plain, inputs), batch, seconds
        )
        results[f"torch inference_mode {tag}"] = images_per_second(
            partial(inference_mode, inputs), batch, seconds
        )
        module.to(memory_format=torch.channels_last)
        last = inputs.contiguous(memory_format=torch.channels_last)
        results[f"torch channels_last  {tag}"] = images_per_second(
            partial(inference_mode, last), batch, seconds
        )
        module.to(memory_format=torch.contiguous_format)
    if compile_model:
        started = time.perf_counter()
        compiled = torch.compile(module)
        for batch in (1, 32):
            inputs = torch.randn(batch, 3, size, size)

            def run_compiled(inputs: torch.Tensor = inputs) -> object:
                with torch.inference_mode():
                    return compiled(inputs)

            try:
                rate = images_per_second(run_compiled, batch, seconds)
            except Exception as exc:  # a CPU or toolchain torch.compile does not support
                logger.info("  torch.compile failed here: %s", exc)
                break
            results[f"torch.compile        {threads}t b{batch:<2}"] = rate
        logger.info(
            "  (torch.compile: %.0f s including compilation)", time.perf_counter() - started
        )
    return results


def raw_onnx(model_dir: Path, seconds: float) -> dict[str, Rate]:
    """Images/s of the image model in ONNX Runtime, per thread count, at batch 1 and 32. The
    limit predict is held to, so it is measured again in every round of the loads (a neighbour
    on the shared host lowers one measurement, and the fastest is the hardware's)."""
    size = ExportedImagePreprocessing.of(read_model_config(model_dir)).image_size
    results: dict[str, Rate] = {}
    for threads in thread_counts():
        session = onnx_session(model_dir / ONNX_FILE, threads)
        for batch in (1, 32):
            inputs = np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)
            ort = partial(session.run, [ONNX_OUTPUT], {ONNX_INPUT: inputs})
            results[f"onnxruntime          {threads}t b{batch:<2}"] = images_per_second(
                ort, batch, seconds
            )
    return results


def text_batches(model_dir: Path, texts: list[str]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Batch 1 (the predict body's text) and 32 (fixture texts) as the server pads them."""
    text = ExportedTextPreprocessing.of(read_model_config(model_dir))
    backend = load_backend(model_dir)

    def padded(batch: list[str]) -> tuple[np.ndarray, np.ndarray]:
        special = SpecialTokens.from_dict(text.special_tokens)
        encoded = encode(
            backend, batch, special, max_length=text.max_length, truncation=text.truncation
        )
        return pad(encoded.ids, special.pad_id)

    return {1: padded(texts[:1]), 32: padded(texts[:32])}


CURVE_BATCHES = (1, 2, 4, 8, 16, 32, 64)


def onnx_batch_curve(model_dir: Path, seconds: float, rounds: int = 2) -> dict[int, Rate]:
    """The image model in ONNX Runtime at the server's thread count, per batch size: the
    batches taking turns for `rounds` rounds, each keeping its cheapest round (CPU)."""
    preprocessing = ExportedImagePreprocessing.of(read_model_config(model_dir))
    size = preprocessing.image_size
    session = onnx_session(model_dir / ONNX_FILE, Settings().resolved_inference_threads)
    curve: dict[int, Rate] = {}
    for _ in range(rounds):
        for batch in CURVE_BATCHES:
            inputs = np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)
            ort = partial(session.run, [ONNX_OUTPUT], {ONNX_INPUT: inputs})
            rate = images_per_second(ort, batch, seconds)
            if batch not in curve or rate.cpu > curve[batch].cpu:
                curve[batch] = rate
    return curve


def own_batch_gain(curve: dict[int, Rate], max_batch: int) -> tuple[int, float]:
    """The model's own gain from batching: its cheapest batch of at most `max_batch` inputs
    (images per CPU-second) over batch 1, and that batch. Batched ÷ unbatched predict cannot
    exceed it where the host's CPU is the limit."""
    best = max((batch for batch in curve if batch <= max_batch), key=lambda b: curve[b].cpu)
    return best, curve[best].cpu / curve[1].cpu


def raw_text_model(model_dir: Path, texts: list[str], seconds: float) -> dict[str, Rate]:
    """Texts/s of the text model in torch (`inference_mode`) and ONNX Runtime."""
    predictor = Predictor.load(model_dir)
    module = predictor.model.eval()
    batches = text_batches(model_dir, texts)
    served_threads = Settings().resolved_inference_threads
    results: dict[str, Rate] = {}
    for threads in thread_counts():
        torch.set_num_threads(threads)
        session = onnx_session(model_dir / ONNX_FILE, threads)
        for batch, (ids, mask) in batches.items():
            stacked = torch.stack([torch.from_numpy(ids), torch.from_numpy(mask)], dim=1)

            def inference_mode(inputs: torch.Tensor = stacked) -> object:
                with torch.inference_mode():
                    return module.forward_tasks(inputs)

            ort = partial(
                session.run, [ONNX_OUTPUT], dict(zip(ONNX_TEXT_INPUTS, (ids, mask), strict=True))
            )
            tag = f"{threads}t b{batch:<2} L{ids.shape[1]:<3}"
            results[f"onnxruntime          {tag}"] = images_per_second(ort, batch, seconds)
            if threads == served_threads:
                results[f"torch inference_mode {tag}"] = images_per_second(
                    inference_mode, batch, seconds
                )
    return results


# --- servers and load ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


BARE = "bare"
"""`server`'s name for the HTTP floor: `bare_app` under uvicorn."""


@contextmanager
def server(app: str, args: argparse.Namespace, env: dict[str, str]) -> Iterator[tuple[str, int]]:
    """thaw as its Dockerfile starts it (`thaw api`, `THAW_API_PROCESSES` processes), or the
    bare app under uvicorn in as many processes, with the same defaults (uvloop, httptools)."""
    port = free_port()
    if app == BARE:
        command = [
            sys.executable, "-m", "uvicorn", "inference:bare_app", "--factory",
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
            "--no-access-log", "--workers", str(args.processes),
        ]  # fmt: skip
    else:
        command = [sys.executable, "-m", "service.cli", "api", "--port", str(port)]
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
    server_cpu_seconds: float
    """CPU time the server's processes (all their threads) used during the run."""
    process_shares: tuple[float, ...] = ()
    """The share of that CPU time of each API process that used at least 1 % of it, largest
    first (empty for a server in one process): how the connections landed."""

    @property
    def answered_rate(self) -> float:
        """2xx answers per second: what a run served, refusals left out."""
        return self.rate * (self.requests - self.refused) / max(1, self.requests)

    @property
    def answered_per_cpu_second(self) -> float:
        """2xx answers per second of the server's CPU time: what a call costs the server,
        whatever share of the shared cores the scheduler gave it during the run."""
        return (self.requests - self.refused) / max(self.server_cpu_seconds, 1e-9)

    def __str__(self) -> str:
        return (
            f"{self.rate:8.1f} req/s  p50 {self.p50_ms:7.1f} ms  p99 {self.p99_ms:7.1f} ms  "
            f"{self.answered_per_cpu_second:6.1f} answers/cpu-s  "
            f"({self.requests} calls, {self.refused} non-2xx, {self.failed} socket errors)"
            + (
                "  CPU by process " + "/".join(f"{share:.0%}" for share in self.process_shares)
                if self.process_shares
                else ""
            )
        )


def cpu_by_process(pid: int) -> dict[int, float]:
    """User and system CPU time of each of a process's children (uvicorn's workers) with
    their own descendants, and of the process itself under its own id."""
    ticks = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # The fields after the command's closing parenthesis: ppid is the 2nd, utime
                # and stime the 12th and 13th.
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:  # the process ended meanwhile
                continue
            stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks)

    def subtree(root: int) -> float:
        tree = [root]
        for member in tree:  # grows as it is walked: breadth first
            tree += [child for child, (parent, _) in stats.items() if parent == member]
        return sum(stats[member][1] for member in tree if member in stats)

    children = [child for child, (parent, _) in stats.items() if parent == pid]
    return {pid: stats.get(pid, (0, 0.0))[1], **{child: subtree(child) for child in children}}


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process and its descendants."""
    return sum(cpu_by_process(pid).values())


def wrk(
    url: str, script: str, args: argparse.Namespace, *, connections: int, server_pid: int
) -> Load:
    folder = Path(args.scratch)
    lua = folder / f"load-{time.monotonic_ns()}.lua"
    lua.write_text(script + WRK_REPORT)
    command = ["wrk", "-t", "1", "-c", str(connections), "-d", f"{args.seconds:g}s"]
    command += ["--timeout", "10s", "-s", str(lua), url]
    cpu_before = cpu_by_process(server_pid)
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    cpu_after = cpu_by_process(server_pid)
    # Each API process's share of the server's CPU over the run (the supervisor left out).
    used = {
        member: cpu_after[member] - cpu_before.get(member, 0.0)
        for member in cpu_after
        if member != server_pid
    }
    server_cpu = sum(cpu_after.values()) - sum(cpu_before.values())
    match = re.search(r"THAW-WRK (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)", out)
    if match is None:
        raise RuntimeError(f"wrk printed no report:\n{out}")
    requests, duration_us, p50, p99, status, failed = (int(g) for g in match.groups())
    rate = requests / (duration_us / 1e6)
    total = max(sum(used.values()), 1e-9)
    # Under 1 %: an idle process, or multiprocessing's resource tracker.
    shares = tuple(sorted((u / total for u in used.values() if u / total >= 0.01), reverse=True))
    return Load(rate, p50 / 1000, p99 / 1000, requests, status, failed, server_cpu, shares)


def histogram_quantile(
    exposition: str, name: str, quantile: float, version_id: str
) -> tuple[int, float]:
    """One version's series of a Prometheus histogram: its count and the upper bound of the
    bucket holding `quantile`."""
    buckets = [
        (float(re.search(r'le="([^"]+)"', labels).group(1)), float(count))  # type: ignore[union-attr]
        for labels, count in re.findall(rf"^{name}_bucket\{{([^}}]*)\}} (\S+)", exposition, re.M)
        if f'version_id="{version_id}"' in labels
    ]
    total = buckets[-1][1] if buckets else 0.0
    bound = next((b for b, count in buckets if count >= quantile * total), float("inf"))
    return int(total), bound


def report_server_times(url: str, key: str, kinds: tuple[str, ...]) -> None:
    """Where accepted calls' time went in the server, per model, from its histograms (bucket
    upper bounds, so coarse)."""
    exposition = httpx.get(f"{url}/metrics").text
    for kind in kinds:
        name = "digits" if kind == "image" else "sections"
        version_id = httpx.get(
            f"{url}/v1/models/{name}/versions/1", headers={"Authorization": f"Bearer {key}"}
        ).json()["id"]
        logger.info("  %s model:", kind)
        for metric, unit in (
            ("thaw_predict_request_seconds", "ms"),
            ("thaw_inference_queue_seconds", "ms"),
            ("thaw_inference_forward_seconds", "ms"),
            ("thaw_inference_batch_size", "inputs"),
        ):
            count, p50 = histogram_quantile(exposition, metric, 0.5, version_id)
            _, p99 = histogram_quantile(exposition, metric, 0.99, version_id)
            scale = 1000 if unit == "ms" else 1
            logger.info(
                "    %-31s p50 <= %6g %s  p99 <= %6g %s  (%d observed)",
                metric, scale * p50, unit, scale * p99, unit, count,
            )  # fmt: skip


def predict_script(body_path: Path, key: str, content_type: str) -> str:
    return f"""
local file = assert(io.open({json.dumps(str(body_path))}, "rb"))
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = "{content_type}"
wrk.headers["Authorization"] = "Bearer {key}"
"""


def oip_body(model_dir: Path, image: bytes, batch: int) -> tuple[bytes, int]:
    """An OIP binary infer request: `batch` copies of the image preprocessed as the version
    says, raw after the JSON header; and the header's length."""
    from worker.engine.modalities.image.pixels import normalise, view_pixels

    preprocessing = ExportedImagePreprocessing.of(read_model_config(model_dir))
    one = view_pixels(Image.open(io.BytesIO(image)), preprocessing.image_size, ("original",))
    tensor = np.ascontiguousarray(normalise(np.repeat(one, batch, axis=0), preprocessing))
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "FP32",
                    "shape": list(tensor.shape),
                    "parameters": {"binary_data_size": tensor.nbytes},
                }
            ],
            "outputs": [{"name": "top_labels"}],
            "parameters": {"top_k": 1},
        }
    ).encode()
    return header + tensor.astype("<f4").tobytes(), len(header)


def oip_script(body_path: Path, key: str, header_length: int) -> str:
    return (
        predict_script(body_path, key, "application/octet-stream")
        + f'wrk.headers["Inference-Header-Content-Length"] = "{header_length}"\n'
    )


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
def profiled(pid: int, args: argparse.Namespace, name: str) -> Iterator[list[Load]]:
    """py-spy samples the server (all threads, native frames off) while the load runs; the
    caller appends the run's `Load`, whose CPU per answer scales the breakdown."""
    loads: list[Load] = []
    if not args.profile:
        yield loads
        return
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / f"{name}.collapsed"
    # --nonblocking: sampling without pausing the server, so it is not slowed by the profile.
    spy = subprocess.Popen(
        [args.py_spy, "record", "--pid", str(pid), "--duration", f"{args.seconds:g}",
         "--rate", "200", "--subprocesses", "--threads", "--nonblocking", "--format", "raw",
         "--output", str(raw)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield loads
    finally:
        spy.wait(timeout=args.seconds + 60)
    report_profile(raw, loads[0] if loads else None)


# Where a predict call's time goes: the first of these patterns found walking a sampled stack
# from its innermost frame outwards names the sample's part.
PROFILE_PARTS = [
    ("forward pass (ONNX Runtime / torch)", r"Session\.run \(|forward_tasks|_torch_forward"),
    ("batch input (normalise, pad)", r"batch_input \("),
    ("batcher (gather, hand results back)", r"Batcher\."),
    ("image decode and resize (Pillow)", r"prepare \(.*image/serving|open_image \(|view_pixels \("),
    ("text tokenize", r"prepare \(.*text/serving"),
    ("key check and version resolution", r"_resolve \(|_resolve_from_caches \("),
    ("body parsing (multipart, JSON)", r"_read_multipart \(|_read_json \("),
    ("top-k and probabilities", r"fill_predictions \("),
    ("metrics (prometheus_client)", r"prometheus_client/"),
    ("response encoding and send", r"orjson|Response\.__call__|RequestResponseCycle\.send"),
    ("predict route, rest", r"router\.py:\d+\)$|_predict \(|predict \(service"),
    ("FastAPI routing and dependencies", r"fastapi/routing|fastapi/dependencies"),
    ("middleware (Starlette/FastAPI)", r"middleware|_body_limit|telemetry|_exception_handler"),
    ("Starlette routing", r"starlette/routing|starlette/applications|fastapi/applications"),
    ("uvicorn HTTP protocol", r"uvicorn/protocols"),
    ("thread pool hand-offs", r"concurrent/futures"),
    ("event loop", r"asyncio|uvloop|Runner\.run"),
]


def report_profile(raw: Path, load: "Load | None") -> None:
    """Per function, the share of the server's busy samples in which it is on the stack; then
    per part of a call, its share and (scaled by the run's server CPU per answer) its ms."""
    inclusive: Counter[str] = Counter()
    parts: Counter[str] = Counter()
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
        part = next(
            (
                name
                for frame in reversed(frames)
                for name, pattern in PROFILE_PARTS
                if re.search(pattern, frame)
            ),
            "other",
        )
        parts[part] += samples
    logger.info("profile: %d busy samples; functions on >= 3 %% of them (inclusive):", total)
    for frame, samples in inclusive.most_common(60):
        if samples / total >= 0.03 and not frame.startswith(
            ("<module>", "run (", "_bootstrap", "process ", "thread ")
        ):
            logger.info("  %5.1f %%  %s", 100 * samples / total, frame)
    cpu_ms = 1000 / load.answered_per_cpu_second if load else float("nan")
    logger.info(
        "  per part of a call (busy samples; ms = share x the server's %.2f CPU-ms per answer;"
        " on a loaded host a runnable thread waiting for a core also counts as busy):",
        cpu_ms,
    )
    for part, samples in parts.most_common():
        share = samples / total
        logger.info("  %5.1f %%  %5.3f ms  %s", 100 * share, share * cpu_ms, part)
    logger.info("  (collapsed stacks: %s)", raw)


# --- the run ----------------------------------------------------------------------------------


SWEEP = [(8, 5.0), (16, 5.0), (32, 0.0), (32, 2.0), (32, 5.0), (32, 10.0), (64, 5.0)]
"""(THAW_BATCH_MAX_SIZE, THAW_BATCH_MAX_DELAY_MS) pairs that `--sweep` runs batched predict at."""


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} (1, 5, 15 min)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0, help="per load run")
    parser.add_argument("--rounds", type=int, default=3, help="turns each load takes")
    parser.add_argument("--raw-seconds", type=float, default=2.0, help="per raw-model figure")
    parser.add_argument(
        "--processes",
        type=int,
        default=Settings().resolved_api_processes,
        help="THAW_API_PROCESSES of the servers (default: thaw's, one per core)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time torch.compile (about 4 minutes of compiling on 2 busy cores)",
    )
    parser.add_argument(
        "--sweep", action="store_true", help="batched predict at several batcher settings"
    )
    parser.add_argument("--profile", help="folder for py-spy profiles of the predict runs")
    args = parser.parse_args()
    # Every Settings() below (the servers' thread count, the batcher's size) as the servers
    # see it.
    os.environ["THAW_API_PROCESSES"] = str(args.processes)
    if shutil.which("wrk") is None:
        raise SystemExit("bench/inference.py needs wrk: apt-get install wrk")
    # py-spy is a dev dependency: it sits beside this interpreter in the virtual environment.
    args.py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=Path(sys.executable).parent)
    if args.profile and args.py_spy is None:
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="thaw-bench-") as folder:
        args.scratch = folder
        data_dir = Path(folder) / "data"
        trained = train(data_dir)
        key = trained.key
        image = png(digits()[-1][0])
        texts = [row["text"] for row in descriptions()[-64:]]
        bodies = {
            "image": Path(folder) / "image-body",
            "text": Path(folder) / "text-body",
        }
        bodies["image"].write_bytes(multipart_body(image))
        bodies["text"].write_bytes(json.dumps({"texts": texts[:1]}).encode())
        thaw_env = {
            "THAW_DATA_DIR": str(data_dir),
            "THAW_REAPER_INTERVAL_SECONDS": "3600",
            # The bench's one key would otherwise be throttled at 20 req/s.
            "THAW_RATE_LIMIT_PER_MINUTE": "0",
        }
        logger.info(
            "%d cores, %d connections, %d rounds of %g s per load, %d API process%s; %s",
            os.cpu_count(),
            args.connections,
            args.rounds,
            args.seconds,
            args.processes,
            "" if args.processes == 1 else "es",
            load_average(),
        )
        logger.info("raw image model (EfficientNet-Lite0, 64 px), images/s (t = threads):")
        raw = raw_model(trained.image_dir, args.raw_seconds, compile_model=args.compile)
        for name, rate in raw.items():
            logger.info("  %s %s", name, rate)
        logger.info("raw text model (minilm_l6, max_length 32), texts/s (L = padded length):")
        curve = onnx_batch_curve(trained.image_dir, args.raw_seconds / 2)
        logger.info(
            "image model in ONNX Runtime at the server's %d thread(s), per batch size:",
            Settings().resolved_inference_threads,
        )
        for batch, rate in curve.items():
            logger.info("  b%-3d %s  (%.2fx b1 per CPU-s)", batch, rate, rate.cpu / curve[1].cpu)
        raw_text = raw_text_model(trained.text_dir, texts, args.raw_seconds)
        for name, rate in raw_text.items():
            logger.info("  %s %s", name, rate)

        get = 'wrk.method = "GET"\nwrk.path = "/healthz"\n'
        scripts = {
            "image": predict_script(
                bodies["image"], key, f"multipart/form-data; boundary={BOUNDARY}"
            ),
            "text": predict_script(bodies["text"], key, "application/json"),
        }
        for batch in OIP_BATCHES:
            body, header_length = oip_body(trained.image_dir, image, batch)
            bodies[f"oip b{batch}"] = Path(folder) / f"oip-body-{batch}"
            bodies[f"oip b{batch}"].write_bytes(body)
            scripts[f"oip b{batch}"] = oip_script(bodies[f"oip b{batch}"], key, header_length)
        paths = {"image": PREDICT_PATH, "text": TEXT_PREDICT_PATH}
        thaw = "service.main:create_app"
        # Batching off: one input per pass, and a queue as deep as the connections, so the
        # unbatched figure measures batching, not refusals.
        unbatched_env = {
            **thaw_env,
            "THAW_BATCH_MAX_SIZE": "1",
            "THAW_BATCH_QUEUE_BATCHES": str(args.connections),
        }
        sweep = SWEEP if args.sweep else []
        loads: dict[str, list[Load]] = {}
        # All servers stay up (idle ones cost nothing) and the loads take turns, round after
        # round, so a neighbour's burst on this shared machine disturbs every figure alike.
        with ExitStack() as servers:
            # Each server's base URL, and its process id (whose CPU time each load reads).
            pids: dict[str, int] = {}
            processes: dict[str, int] = {}

            def start(app: str, env: dict[str, str]) -> str:
                url, pid = servers.enter_context(server(app, args, env))
                pids[url] = pid
                processes[url] = int(env.get("THAW_API_PROCESSES", args.processes))
                return url

            bare_url = start(BARE, {})
            batched_url = start(thaw, thaw_env)
            unbatched_url = start(thaw, unbatched_env)
            # The same server in one process: what the processes add.
            single_url = (
                start(thaw, {**thaw_env, "THAW_API_PROCESSES": "1"}) if args.processes > 1 else None
            )
            # The 32-image OIP calls come on two connections per process (one call read and
            # queued while the one before it runs). The kernel spreads connections over the
            # processes unevenly (three or four on one, often): a queue of as many passes as
            # connections takes every call however they land, so the figure measures the
            # path, not refusals (with the default 2, a process holding three connections
            # refused the third's calls at once and wrk resent them at once: 503 storms).
            oip_connections = 2 * args.processes
            oip_env = {**thaw_env, "THAW_BATCH_QUEUE_BATCHES": str(oip_connections)}
            oip_url = start(thaw, oip_env)
            # The same with connections kept open however long they live: where they land at
            # the start is where they stay (THAW_CONNECTION_MAX_AGE_SECONDS's reason).
            oip_kept_url = start(thaw, {**oip_env, "THAW_CONNECTION_MAX_AGE_SECONDS": "0"})
            swept = {
                (size, delay): start(
                    thaw,
                    {
                        **thaw_env,
                        "THAW_BATCH_MAX_SIZE": str(size),
                        "THAW_BATCH_MAX_DELAY_MS": str(delay),
                    },
                )
                for size, delay in sweep
            }
            every = (batched_url, unbatched_url, single_url, oip_url, oip_kept_url)
            for url in (*every, *swept.values()):
                for kind in ("image", "text"):
                    if url is not None:
                        warm_up(url, key, kind, bodies[kind], processes[url])
            served_by = re.findall(
                r'thaw_inference_backend\{[^}]*backend="(\w+)"[^}]*reason="([^"]*)"',
                httpx.get(f"{batched_url}/metrics").text,
            )
            for round_number in range(args.rounds):
                if round_number:
                    for name, rate in raw_onnx(trained.image_dir, args.raw_seconds).items():
                        raw[name] = max(raw[name], rate, key=lambda rate: rate.wall)
                # (label, server, path, wrk script)
                runs: list[tuple[str, str, str, str]] = [
                    ("bare FastAPI GET", bare_url, "", get),
                    ("thaw /healthz", batched_url, "", get),
                ]
                for kind in ("image", "text"):
                    runs += [
                        (f"{kind} batched", batched_url, paths[kind], scripts[kind]),
                        (f"{kind} unbatched", unbatched_url, paths[kind], scripts[kind]),
                    ]
                runs += [
                    ("oip binary b1", batched_url, OIP_PATH, scripts["oip b1"]),
                    ("oip binary b32", oip_url, OIP_PATH, scripts["oip b32"]),
                    ("oip b32 kept", oip_kept_url, OIP_PATH, scripts["oip b32"]),
                ]
                if single_url is not None:
                    runs.append(("image 1 process", single_url, PREDICT_PATH, scripts["image"]))
                runs += [
                    (f"image b{size} {delay:g}ms", url, PREDICT_PATH, scripts["image"])
                    for (size, delay), url in swept.items()
                ]
                for label, url, path, script in runs:
                    profiling = round_number == 0 and label in ("image batched", "text batched")
                    recorder: AbstractContextManager[list[Load]] = (
                        profiled(pids[url], args, label.replace(" ", "-"))
                        if profiling
                        else nullcontext([])
                    )
                    connections = oip_connections if "b32" in label else None
                    with recorder as seen:
                        load = wrk(
                            f"{url}{path}",
                            script,
                            args,
                            connections=connections or args.connections,
                            server_pid=pids[url],
                        )
                        seen.append(load)
                    loads.setdefault(label, []).append(load)
                    logger.info("%-18s %s", label, load)
            logger.info("in the batched server, all rounds (image and text calls):")
            report_server_times(batched_url, key, ("image", "text"))

        # Eight times the connections at the default settings: the model's queue refuses
        # what would wait more than THAW_BATCH_QUEUE_BATCHES passes, at once, and the calls it
        # accepts keep a bounded latency.
        overload_connections = 8 * args.connections
        with server(thaw, args, thaw_env) as (url, pid):
            warm_up(url, key, "image", bodies["image"], args.processes)
            overload = wrk(
                f"{url}{PREDICT_PATH}",
                scripts["image"],
                args,
                connections=overload_connections,
                server_pid=pid,
            )
            logger.info("overload (%d connections) %s", overload_connections, overload)
            logger.info(
                "  %.1f answered/s; wrk's p50/p99 are of every call, the refused ones included;"
                " the server's, of the accepted ones:",
                overload.answered_rate,
            )
            report_server_times(url, key, ("image",))

        # The fastest round is the one the neighbours disturbed least; fastest in answers, since
        # a round whose calls were mostly refused (503 at once) has a high rate of little.
        best = {
            label: max(runs, key=lambda load: load.answered_rate) for label, runs in loads.items()
        }
        logger.info("fastest round of each:")
        for label, load in best.items():
            logger.info("  %-18s %s", label, load)
        logger.info("served by: %s", served_by or "(not reported)")
        logger.info("raw image model in ONNX Runtime, fastest of the %d rounds:", args.rounds)
        for name, rate in raw.items():
            if name.startswith("onnxruntime"):
                logger.info("  %s %s", name, rate)
        bare = best["bare FastAPI GET"]
        threads = Settings().resolved_inference_threads
        max_batch = Settings().batch_max_size
        text_curve = {
            batch: next(
                rate
                for name, rate in raw_text.items()
                if name.startswith("onnxruntime") and f" {threads}t b{batch} " in f"{name} "
            )
            for batch in (1, 32)
        }
        limits: dict[str, float] = {}
        for kind, rates, model_curve in (("image", raw, curve), ("text", raw_text, text_curve)):
            batched, unbatched = best[f"{kind} batched"], best[f"{kind} unbatched"]
            ort = {
                batch: max(
                    rate.wall
                    for name, rate in rates.items()
                    if "onnxruntime" in name and f" b{batch} " in f"{name} "
                )
                for batch in (1, 32)
            }
            limits[kind] = min(bare.rate, ort[32])
            if kind == "image":
                ort_images = ort
            own_batch, own_gain = own_batch_gain(model_curve, max_batch)
            gain = batched.answered_rate / unbatched.answered_rate
            cpu_gain = batched.answered_per_cpu_second / unbatched.answered_per_cpu_second
            logger.info(
                "%s: predict / min(HTTP floor %.0f, raw ORT b32 %.0f) = %.2f   (target >= 0.5)",
                kind,
                bare.rate,
                ort[32],
                batched.answered_rate / limits[kind],
            )
            logger.info(
                "%s: batched / unbatched = %.2fx in req/s (target >= 3), %.2fx in answers per "
                "server CPU-s; the model's own batch gain (ORT b%d / b1 per CPU-s, %d thread%s) "
                "= %.2fx, the most batching can give where the CPU is the limit",
                kind,
                gain,
                cpu_gain,
                own_batch,
                threads,
                "" if threads == 1 else "s",
                own_gain,
            )
            logger.info(
                "%s: p99 / p50 batched = %.2f   (target <= 3)",
                kind,
                batched.p99_ms / batched.p50_ms,
            )
        oip_images = best["oip binary b32"].answered_rate * 32
        logger.info(
            "oip binary: b32 images/s / raw ORT b32 = %.0f / %.0f = %.2f   (target >= 0.8)",
            oip_images,
            ort_images[32],
            oip_images / ort_images[32],
        )
        for label in ("oip binary b32", "oip b32 kept"):
            logger.info(
                "  %s, every round: %s of raw ORT b32, CPU by process %s",
                label,
                ", ".join(f"{run.answered_rate * 32 / ort_images[32]:.2f}" for run in loads[label]),
                ", ".join("/".join(f"{s:.0%}" for s in run.process_shares) for run in loads[label]),
            )
        logger.info(
            "oip binary: b1 calls/s / image predict calls/s = %.0f / %.0f = %.2f   (target >= 1)",
            best["oip binary b1"].answered_rate,
            best["image batched"].answered_rate,
            best["oip binary b1"].answered_rate / best["image batched"].answered_rate,
        )
        if "image 1 process" in best:
            single = best["image 1 process"].answered_rate
            logger.info(
                "image: %d processes / 1 process = %.2fx; 1 process / limit = %.2f",
                args.processes,
                best["image batched"].answered_rate / single,
                single / limits["image"],
            )
        logger.info(
            "healthz / bare = %.2f   (target >= 0.8)", best["thaw /healthz"].rate / bare.rate
        )
        logger.info("at the end: %s", load_average())


def warm_up(url: str, key: str, kind: str, body: Path, processes: int) -> None:
    """Calls on new connections, several at once, until each of the server's processes has
    loaded the model (the pooled count of loads says so), so no load run pays for a load."""
    path = PREDICT_PATH if kind == "image" else TEXT_PREDICT_PATH
    content_type = (
        f"multipart/form-data; boundary={BOUNDARY}" if kind == "image" else "application/json"
    )
    headers = {"Authorization": f"Bearer {key}", "Content-Type": content_type}
    content = body.read_bytes()

    def call(_: int) -> None:
        httpx.post(f"{url}{path}", headers=headers, content=content, timeout=120).raise_for_status()

    def loads() -> float:
        scrape = httpx.get(f"{url}/metrics", timeout=10).text
        pattern = r"^thaw_model_cache_loads_total\{[^}]*\} (\S+)$"
        return sum(float(value) for value in re.findall(pattern, scrape, re.M))

    target = loads() + processes
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(100):
            list(pool.map(call, range(8)))
            if loads() >= target:
                return
    raise RuntimeError(f"{kind} calls to {url} did not reach all {processes} processes")


if __name__ == "__main__":
    main()
