"""Inference: loaded models in a memory-budgeted LRU cache, each behind a dynamic batcher.

A predict call decodes and resizes its images in the decode pool (Pillow works outside the
GIL), then hands their uint8 pixels to the model's batcher. The batcher's one worker thread
gathers waiting requests into a single forward pass (up to `batch_max_size` images, waiting at
most `batch_max_delay_ms` for more), normalises the whole batch in one operation, and answers
each request with its rows. Texts go the same way: tokenized in the decode pool, then padded
to the longest text of the gathered batch. The queue in front of it is bounded: when it is
full the call is refused at once (503), so no caller waits without bound.

A version is served by ONNX Runtime when its `model.onnx` passed the publisher's parity check,
by PyTorch otherwise; `LoadedModel.backend_reason` (and the `thaw_inference_backend` metric)
says why a version runs in PyTorch.
"""

import dataclasses
import gc
import io
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from service.context import AppContext
from service.datasets.ingest import ImageRejectedError, IngestLimits, open_image
from service.datasets.service import ingest_limits
from service.inference.metrics import InferenceMetrics
from service.inference.resolution import ServedVersion
from service.settings import Settings
from service.storage import ArtifactStore
from worker import engine
from worker.engine.artifacts import (
    ONNX_FEATURES,
    ONNX_FILE,
    ONNX_OUTPUT,
    ModelConfig,
    read_model_config,
)
from worker.engine.modalities import modality_for
from worker.engine.modalities.base import RejectedItemError, ServedInputs, average_views

logger = logging.getLogger(__name__)

# How long an idle batcher thread sleeps before checking whether it was shut down.
IDLE_POLL_SECONDS = 0.5

Prediction = dict[str, Any]
"""One input's entry in a predict answer: `image` or `text_index`, and `top` or `error`."""


RESOLVE_THREADS = 4
"""Threads resolving predict calls' keys and versions: below SQLAlchemy's default pool of 5
connections, so a burst of calls queues for them instead of opening overflow connections."""


@cache
def decode_pool() -> ThreadPoolExecutor:
    """Image decoding and resizing, off the event loop (Pillow releases the GIL). One per
    process, like the cores it shares out; apps started and stopped in it share it."""
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="decode")


@cache
def resolve_pool() -> ThreadPoolExecutor:
    """The key check and version resolution of predict calls, one per process."""
    return ThreadPoolExecutor(max_workers=RESOLVE_THREADS, thread_name_prefix="resolve")


class QueueFullError(Exception):
    """The model's request queue is full; the caller should retry later."""


class ModelUnloadedError(Exception):
    """The model was unloaded between lookup and submit; look it up again."""


@dataclass(frozen=True)
class Outputs:
    """A forward pass's answer: per task, class logits (a row per input row), and the pooled
    backbone features of the same rows (None from a `model.onnx` exported without them)."""

    logits: list[np.ndarray]
    features: np.ndarray | None

    def rows(self, start: int, end: int) -> "Outputs":
        features = None if self.features is None else self.features[start:end]
        return Outputs([task[start:end] for task in self.logits], features)


@dataclass
class LoadedModel:
    version_id: str
    name: str
    tasks: dict[str, list[str]]
    """Labels per task, oldest first: one task, or several for a Learning-without-Forgetting
    model. The last is the newest, answered when a request names none."""
    inputs: ServedInputs
    """How its requests become its forward pass's input (its modality's serving half)."""
    backend: str
    nbytes: int
    forward: Callable[[Any], Outputs]
    """A forward-pass input as `inputs.batch_input` makes it (a normalised (N, 3, H, W) float32
    batch; ids and attention mask) → per task, class logits, and the pooled features, a row
    per input row."""
    temperatures: list[float]
    """Per task, what its logits are divided by for calibrated probabilities
    (`ModelConfig.temperatures`)."""
    backend_reason: str | None = None
    """Why this version runs in PyTorch rather than ONNX Runtime; None when it runs in ONNX."""
    batcher: "Batcher | None" = None

    @property
    def modality(self) -> str:
        return self.inputs.modality

    def batch_input(self, inputs: list[Any]) -> Any:
        """The requests' inputs as one forward pass's (`ServedInputs.batch_input`)."""
        return self.inputs.batch_input(inputs)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    result: np.ndarray = shifted / shifted.sum(axis=1, keepdims=True)
    return result


def choose_backend(
    version: ServedVersion, config: ModelConfig, model_dir: Path, *, requested: str
) -> tuple[str, str | None]:
    """ONNX Runtime where the version's `model.onnx` passed its parity check, else PyTorch and
    the reason."""
    if requested == "torch":
        return "torch", "THAW_INFERENCE_BACKEND is torch"
    if len(config.tasks) > 1:
        # The ONNX graph holds the newest head only; the old tasks' heads need PyTorch.
        return "torch", f"the model answers {len(config.tasks)} tasks; model.onnx has one head"
    onnx = version.exports.get("onnx")
    if onnx is None:
        return "torch", "no ONNX export at publish (THAW_ONNX_EXPORT was off)"
    if not onnx.get("exported"):
        return "torch", f"ONNX export did not pass: {onnx.get('reason')}"
    if not (model_dir / ONNX_FILE).exists():
        return "torch", f"{ONNX_FILE} is missing from the version's artifacts"
    return "onnx", None


def load_model(
    model_dir: Path, *, version: ServedVersion, backend: str, threads: int
) -> LoadedModel:
    """Load a version's artifacts with the backend `choose_backend` picks, then warm it up."""
    config = read_model_config(model_dir)
    inputs = modality_for(config.modality).served_inputs(config, model_dir)
    used, reason = choose_backend(version, config, model_dir, requested=backend)
    forward: Callable[[Any], Outputs]
    if used == "onnx":
        forward = _onnx_forward(model_dir / ONNX_FILE, threads, inputs)
        nbytes = (model_dir / ONNX_FILE).stat().st_size
    else:
        forward, nbytes = _torch_forward(model_dir, threads, inputs)
    return _warmed_up(
        config,
        inputs,
        version_id=version.id,
        name=version.model_name,
        forward=forward,
        nbytes=nbytes,
        backend=used,
        reason=reason,
    )


def load_in_memory(model_dir: Path, *, model: Any, version_id: str) -> LoadedModel:
    """The exported model in `model_dir` served by PyTorch from `model`, the trained module whose
    weights it holds, still in memory (the worker computing a reference profile at publish)."""
    config = read_model_config(model_dir)
    inputs = modality_for(config.modality).served_inputs(config, model_dir)
    forward, nbytes = _torch_forward(model_dir, None, inputs, model=model)
    return _warmed_up(
        config,
        inputs,
        version_id=version_id,
        name="",
        forward=forward,
        nbytes=nbytes,
        backend="torch",
        reason="in memory",
    )


def _warmed_up(
    config: ModelConfig,
    inputs: ServedInputs,
    *,
    version_id: str,
    name: str,
    forward: Callable[[Any], Outputs],
    nbytes: int,
    backend: str,
    reason: str | None,
) -> LoadedModel:
    loaded = LoadedModel(
        version_id=version_id,
        name=name,
        tasks=config.task_labels(),
        inputs=inputs,
        backend=backend,
        backend_reason=reason,
        nbytes=nbytes,
        forward=forward,
        temperatures=config.temperatures(),
    )
    # The first pass allocates and picks kernels; pay for it here, not in a caller's request.
    loaded.forward(inputs.warm_up_input())
    return loaded


def _onnx_forward(path: Path, threads: int, inputs: ServedInputs) -> Callable[[Any], Outputs]:
    session = onnx_session(path, threads)
    # A model.onnx exported before monitoring has no features output: served without them.
    names = [ONNX_OUTPUT]
    if ONNX_FEATURES in {output.name for output in session.get_outputs()}:
        names.append(ONNX_FEATURES)

    def forward(batch: Any) -> Outputs:
        outputs = session.run(names, inputs.onnx_feed(batch))
        return Outputs(
            [np.asarray(outputs[0])], np.asarray(outputs[1]) if len(outputs) > 1 else None
        )

    return forward


def onnx_session(path: Path, threads: int) -> Any:
    """An ONNX Runtime session configured as predict runs it (bench/inference.py measures this)."""
    # Imported here: only a process that serves an ONNX version needs the runtime.
    import onnxruntime

    options = onnxruntime.SessionOptions()
    # The batcher runs one pass at a time: intra-op threads are all the parallelism it
    # can use, and spinning threads would take cores from the request path.
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _torch_forward(
    model_dir: Path, threads: int | None, inputs: ServedInputs, *, model: Any = None
) -> tuple[Callable[[Any], Outputs], int]:
    """The PyTorch forward pass of a version, and the bytes its weights take. `model`: the
    module whose weights `model_dir` holds, already in memory; `threads` None leaves torch's."""
    # Imported here, as onnxruntime is above: an API process that serves only ONNX versions
    # never loads torch.
    import torch

    if threads is not None:
        # Process-wide; the API process's other torch work (previews) is light.
        torch.set_num_threads(threads)
    if model is None:
        model = engine.load_exported(model_dir)
    # Every head is a small layer on shared features: computing all of them lets one batch
    # serve requests for different tasks.
    run, module = modality_for(inputs.modality).torch_forward(model.eval(), torch.device("cpu"))

    def forward(batch: Any) -> Outputs:
        features, logits = run(batch)
        return Outputs(
            [task.float().cpu().numpy() for task in logits], features.float().cpu().numpy()
        )

    tensors = [*module.parameters(), *module.buffers()]
    return forward, sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class _Request:
    inputs: Any
    """N rows as `ServedInputs.prepare` makes them, or an Open Inference Protocol tensor
    already preprocessed (`OipInput.preprocessed`)."""
    queued_at: float = field(default_factory=time.perf_counter)
    future: Future[Outputs] = field(default_factory=Future)


class Reservation:
    """Room for one call's inputs in a batcher, held from admission (before decoding) until
    the batcher takes them into a forward pass, or released unused."""

    def __init__(self, batcher: "Batcher", count: int) -> None:
        self._batcher = batcher
        self._count = count
        self._submitted = False

    def submit(self, inputs: Any) -> Future[Outputs]:
        """Queue the decoded inputs (at most the reserved count: unreadable ones drop out)."""
        assert not self._submitted
        assert len(inputs) <= self._count
        self._submitted = True
        return self._batcher._enqueue(inputs, reserved=self._count)

    def release(self) -> None:
        """Give the room back unless the inputs were submitted; safe to call twice."""
        if not self._submitted:
            self._submitted = True
            self._batcher._release(self._count)


class Batcher:
    """One worker thread per loaded model, running gathered requests as one forward pass.

    Admission is counted in inputs: `reserve` holds room for a call's inputs before they are
    decoded, and refuses (QueueFullError) once `queue_batches` full passes' worth are waiting,
    so an accepted call waits for at most that many passes, plus the one running, plus its
    own: its latency is bounded by the measured pass time (`thaw_inference_forward_seconds`),
    whatever the offered load.
    """

    def __init__(
        self,
        model: LoadedModel,
        *,
        max_size: int,
        max_delay: float,
        queue_batches: int,
        metrics: InferenceMetrics,
    ) -> None:
        self.model = model
        self.max_size = max_size
        self.max_delay = max_delay
        self.capacity = queue_batches * max_size
        self._queue: queue.Queue[_Request] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        """Inputs reserved or queued and not yet in a forward pass."""
        self._stopping = False
        self._closed = False
        labels = (model.version_id,)
        self._batch_size = metrics.batch_size.labels(*labels)
        self._depth = metrics.queue_depth.labels(*labels)
        self._rejected = metrics.rejected.labels(*labels)
        self._queue_seconds = metrics.queue_seconds.labels(*labels)
        self._forward_seconds = metrics.forward_seconds.labels(*labels)
        self._thread = threading.Thread(
            target=self._run, name=f"batcher-{model.version_id}", daemon=True
        )
        self._thread.start()

    def reserve(self, count: int) -> Reservation:
        """Room for `count` inputs, or QueueFullError when the queue holds its capacity. A call
        larger than the capacity alone is let in when nothing waits (it is one pass)."""
        with self._lock:
            if self._closed:
                raise ModelUnloadedError(self.model.version_id)
            if self._waiting and self._waiting + count > self.capacity:
                self._rejected.inc()
                raise QueueFullError(self.model.version_id)
            self._waiting += count
            self._depth.set(self._waiting)
        return Reservation(self, count)

    def submit(self, inputs: Any) -> Future[Outputs]:
        """Reserve and queue at once (inputs already decoded)."""
        return self.reserve(len(inputs)).submit(inputs)

    def _enqueue(self, inputs: Any, *, reserved: int) -> Future[Outputs]:
        request = _Request(inputs)
        with self._lock:
            self._waiting -= reserved - len(inputs)
            self._queue.put_nowait(request)
        return request.future

    def _release(self, count: int) -> None:
        with self._lock:
            self._waiting -= count
            self._depth.set(self._waiting)

    def stop(self) -> None:
        """Finish what is queued or reserved, then end the thread; later reserves raise
        ModelUnloadedError."""
        self._stopping = True

    def _next(self, timeout: float | None) -> _Request | None:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _run(self) -> None:
        held: _Request | None = None
        while True:
            first = held or self._next(IDLE_POLL_SECONDS)
            held = None
            if first is None:
                with self._lock:
                    if self._stopping and self._waiting == 0:
                        self._closed = True
                        return
                continue
            batch = [first]
            count = len(first.inputs)
            deadline = time.monotonic() + self.max_delay
            while count < self.max_size:
                waiting = deadline - time.monotonic()
                request = self._next(waiting) if waiting > 0 else self._next_nowait()
                if request is None:
                    break
                if count + len(request.inputs) > self.max_size:
                    held = request  # would overflow this pass; it opens the next one
                    break
                batch.append(request)
                count += len(request.inputs)
            self._forward(batch, count)

    def _next_nowait(self) -> _Request | None:
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return None

    def _forward(self, batch: list[_Request], count: int) -> None:
        started = time.perf_counter()
        with self._lock:
            self._waiting -= count
            self._depth.set(self._waiting)
        self._batch_size.observe(count)
        for request in batch:
            self._queue_seconds.observe(started - request.queued_at)
        try:
            inputs = self.model.batch_input([request.inputs for request in batch])
            outputs = self.model.forward(inputs)
        except Exception as exc:
            logger.exception("forward pass of %s failed", self.model.version_id)
            for request in batch:
                request.future.set_exception(exc)
            return
        finally:
            self._forward_seconds.observe(time.perf_counter() - started)
        start = 0
        for request in batch:
            end = start + len(request.inputs)
            request.future.set_result(outputs.rows(start, end))
            start = end


class ModelCache:
    """Loaded models, least recently used first out, within a count and a memory budget."""

    def __init__(
        self, *, store: ArtifactStore, settings: Settings, metrics: InferenceMetrics
    ) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        # One lock per version being loaded, so concurrent first calls load it once.
        self._loading: dict[str, threading.Lock] = {}

    def peek(self, version: ServedVersion) -> LoadedModel | None:
        """The loaded model, or None when it needs loading (`get`, off the event loop)."""
        with self._lock:
            model = self._hit(version.id)
        if model is not None:
            self.metrics.cache_hits.labels(version.id).inc()
        return model

    def get(self, version: ServedVersion) -> LoadedModel:
        labels = (version.id,)
        with self._lock:
            model = self._hit(version.id)
            if model is not None:
                self.metrics.cache_hits.labels(*labels).inc()
                return model
            loading = self._loading.setdefault(version.id, threading.Lock())
        with loading:
            with self._lock:
                model = self._hit(version.id)
            if model is not None:
                self.metrics.cache_hits.labels(*labels).inc()
                return model
            # Loading happens outside the cache lock so one slow load does not stall others.
            model = load_model(
                self.store.local_path(version.artifact_prefix),
                version=version,
                backend=self.settings.inference_backend,
                threads=self.settings.resolved_inference_threads,
            )
            model.batcher = Batcher(
                model,
                max_size=self.settings.batch_max_size,
                max_delay=self.settings.batch_max_delay_ms / 1000,
                queue_batches=self.settings.batch_queue_batches,
                metrics=self.metrics,
            )
            self.metrics.cache_loads.labels(*labels).inc()
            self.metrics.backend.labels(*labels, model.backend, model.backend_reason or "").set(1)
            logger.info(
                "loaded %s (%s%s, %d bytes)",
                version.id,
                model.backend,
                f": {model.backend_reason}" if model.backend_reason else "",
                model.nbytes,
            )
            with self._lock:
                self._loaded[version.id] = model
                self._shrink()
                self._loading.pop(version.id, None)
            # The model's objects (many for a torch module) stay until it is unloaded: keep
            # them out of full collections too (`gc.freeze` at startup, service/main.py).
            gc.collect()
            gc.freeze()
        return model

    def _hit(self, version_id: str) -> LoadedModel | None:
        model = self._loaded.get(version_id)
        if model is not None:
            self._loaded.move_to_end(version_id)
        return model

    def _shrink(self) -> None:
        # The newest model always stays, even alone over budget: it is about to serve a call.
        while len(self._loaded) > 1 and (
            len(self._loaded) > self.settings.model_cache_size
            or self._total_bytes() > self.settings.model_cache_bytes
        ):
            _, oldest = self._loaded.popitem(last=False)
            self._unload(oldest)
        self.metrics.cache_bytes.set(self._total_bytes())

    def _total_bytes(self) -> int:
        return sum(model.nbytes for model in self._loaded.values())

    def _unload(self, model: LoadedModel) -> None:
        if model.batcher is not None:
            model.batcher.stop()
        # Frozen objects are never collected as cycles: hand them back to the collector so an
        # unloaded model's cycles can go (the next load freezes what is left again).
        gc.unfreeze()
        self.metrics.cache_evictions.labels(model.version_id).inc()
        self.metrics.unloaded(model.version_id, model.backend, model.backend_reason or "")
        logger.info("unloaded %s", model.version_id)

    def evict(self, version_id: str) -> None:
        with self._lock:
            model = self._loaded.pop(version_id, None)
            if model is not None:
                self._unload(model)
            self.metrics.cache_bytes.set(self._total_bytes())

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def close(self) -> None:
        with self._lock:
            for model in self._loaded.values():
                self._unload(model)
            self._loaded.clear()


def predict_limits(context: AppContext) -> IngestLimits:
    """The image limits of predict: an upload's, with predict's own (lower) pixel cap, so one
    call's decoding stays well under a second."""
    return dataclasses.replace(
        ingest_limits(context), max_image_pixels=context.settings.max_predict_pixels
    )


def predict_reading(context: AppContext) -> "ItemReader":
    """How predict reads a call's items: images at `predict_limits`, texts up to
    `THAW_MAX_PREDICT_TEXT_CHARS`."""
    return ItemReader(
        predict_limits(context), max_text_chars=context.settings.max_predict_text_chars
    )


@dataclass(frozen=True)
class ItemReader:
    """The service's `ItemReading`: untrusted images opened under `limits` (the format
    allowlist, the pixel cap); texts read up to `max_text_chars` characters."""

    limits: IngestLimits
    max_text_chars: int

    def open_image(self, data: bytes, *, draft_to: int) -> Image.Image:
        try:
            return open_image(io.BytesIO(data), self.limits, draft_to=draft_to)
        except ImageRejectedError as exc:
            raise RejectedItemError(exc.code, exc.reason) from None


def fill_predictions(
    model: LoadedModel,
    results: list[Prediction],
    good: list[int],
    outputs: Outputs,
    *,
    task: str,
    top_k: int,
    calibrated: bool,
) -> None:
    """Each good input's top-k labels, with probabilities calibrated unless asked not to and
    (images) averaged over the input's test-time views, as the torch predictor does."""
    labels = model.tasks[task]
    views = model.inputs.views
    rows = probabilities(model, outputs.logits, task=task, calibrated=calibrated, views=views)
    k = max(1, min(top_k, len(labels)))
    for index, row in zip(good, rows, strict=True):
        top = np.argsort(-row, kind="stable")[:k]
        results[index]["top"] = [
            {"label": labels[i], "probability": float(row[i])} for i in top.tolist()
        ]


def probabilities(
    model: LoadedModel, logits: list[np.ndarray], *, task: str, calibrated: bool, views: int
) -> np.ndarray:
    """A task's class probabilities, a row per input: calibrated unless asked not to, and
    averaged over each input's `views` adjacent rows (its test-time views)."""
    index = list(model.tasks).index(task)
    temperature = model.temperatures[index] if calibrated else 1.0
    return average_views(_softmax(logits[index] / temperature), views)
