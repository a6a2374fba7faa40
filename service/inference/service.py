"""Inference: loaded models in a memory-budgeted LRU cache, each behind a dynamic batcher.

A predict call decodes and preprocesses its images on its own (thread pool) thread, then hands
the tensors to the model's batcher. The batcher's one worker thread gathers waiting requests
into a single forward pass (up to `batch_max_size` images, waiting at most `batch_max_delay_ms`
for more), and answers each request with its rows. The queue in front of it is bounded: when it
is full the call is refused at once (503), so no caller waits without bound.
"""

import io
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from service.datasets.ingest import ImageRejectedError, IngestLimits, open_image
from service.inference.metrics import InferenceMetrics
from service.inference.schemas import ImageError, ImagePrediction, LabelScore
from service.settings import Settings
from service.storage import ArtifactStore
from service.tables import ModelVersion
from worker.engine import Predictor, preprocess
from worker.engine.artifacts import (
    ONNX_FILE,
    ONNX_INPUT,
    ONNX_OUTPUT,
    Preprocessing,
    read_model_config,
)

logger = logging.getLogger(__name__)

# How long an idle batcher thread sleeps before checking whether it was shut down.
IDLE_POLL_SECONDS = 0.5


class QueueFullError(Exception):
    """The model's request queue is full; the caller should retry later."""


class ModelUnloadedError(Exception):
    """The model was unloaded between lookup and submit; look it up again."""


@dataclass
class LoadedModel:
    version_id: str
    name: str
    tasks: dict[str, list[str]]
    """Labels per task, oldest first: one task, or several for a Learning-without-Forgetting
    model. The last is the newest, answered when a request names none."""
    preprocessing: Preprocessing
    backend: str
    nbytes: int
    forward: Callable[[torch.Tensor], list[np.ndarray]]
    """A batch of preprocessed images → per task, class probabilities with a row per image."""
    batcher: "Batcher | None" = None

    def prepare(self, image: Image.Image) -> torch.Tensor:
        return preprocess(
            image,
            image_size=self.preprocessing.image_size,
            mean=self.preprocessing.mean,
            std=self.preprocessing.std,
        )


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    result: np.ndarray = shifted / shifted.sum(axis=1, keepdims=True)
    return result


def load_model(model_dir: Path, *, version: ModelVersion, backend: str) -> LoadedModel:
    """Load a version's artifacts with the requested backend, then warm it up."""
    config = read_model_config(model_dir)
    onnx_path = model_dir / ONNX_FILE
    tasks = config.task_labels()
    forward: Callable[[torch.Tensor], list[np.ndarray]]
    # The ONNX graph holds the newest head only, so models that keep old tasks run in torch.
    if backend == "onnx" and onnx_path.exists() and len(tasks) == 1:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

        def forward(batch: torch.Tensor) -> list[np.ndarray]:
            (logits,) = session.run([ONNX_OUTPUT], {ONNX_INPUT: batch.numpy()})
            return [_softmax(np.asarray(logits))]

        nbytes = onnx_path.stat().st_size
        used = "onnx"
    else:
        predictor = Predictor.load(model_dir)
        module = predictor.model

        def forward(batch: torch.Tensor) -> list[np.ndarray]:
            # Every head is a small layer on shared features: computing all of them lets one
            # batch serve requests for different tasks.
            with torch.inference_mode():
                outputs = module.forward_tasks(batch.to(predictor.device))
                return [logits.softmax(dim=1).cpu().numpy() for logits in outputs]

        nbytes = sum(
            t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()]
        )
        used = "torch"
    loaded = LoadedModel(
        version_id=version.id,
        name=version.model.name,
        tasks=tasks,
        preprocessing=config.preprocessing,
        backend=used,
        nbytes=nbytes,
        forward=forward,
    )
    # The first pass allocates and picks kernels; pay for it here, not in a caller's request.
    size = loaded.preprocessing.image_size
    loaded.forward(torch.zeros(1, 3, size, size))
    return loaded


@dataclass
class _Request:
    inputs: torch.Tensor
    future: Future[list[np.ndarray]] = field(default_factory=Future)


class Batcher:
    """One worker thread per loaded model, running gathered requests as one forward pass."""

    def __init__(
        self,
        model: LoadedModel,
        *,
        max_size: int,
        max_delay: float,
        queue_size: int,
        metrics: InferenceMetrics,
    ) -> None:
        self.model = model
        self.max_size = max_size
        self.max_delay = max_delay
        self._queue: queue.Queue[_Request] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._stopping = False
        self._closed = False
        labels = (model.name, model.version_id)
        self._batch_size = metrics.batch_size.labels(*labels)
        self._depth = metrics.queue_depth.labels(*labels)
        self._rejected = metrics.rejected.labels(*labels)
        self._thread = threading.Thread(
            target=self._run, name=f"batcher-{model.version_id}", daemon=True
        )
        self._thread.start()

    def submit(self, inputs: torch.Tensor) -> Future[list[np.ndarray]]:
        request = _Request(inputs)
        with self._lock:
            if self._closed:
                raise ModelUnloadedError(self.model.version_id)
            try:
                self._queue.put_nowait(request)
            except queue.Full:
                self._rejected.inc()
                raise QueueFullError(self.model.version_id) from None
        self._depth.set(self._queue.qsize())
        return request.future

    def stop(self) -> None:
        """Finish what is queued, then end the thread; later submits raise ModelUnloadedError."""
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
                    if self._stopping and self._queue.empty():
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
            self._depth.set(self._queue.qsize())
            self._forward(batch, count)

    def _next_nowait(self) -> _Request | None:
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return None

    def _forward(self, batch: list[_Request], count: int) -> None:
        self._batch_size.observe(count)
        try:
            inputs = batch[0].inputs if len(batch) == 1 else torch.cat([r.inputs for r in batch])
            probabilities = self.model.forward(inputs)
        except Exception as exc:
            logger.exception("forward pass of %s failed", self.model.version_id)
            for request in batch:
                request.future.set_exception(exc)
            return
        start = 0
        for request in batch:
            end = start + len(request.inputs)
            request.future.set_result([task[start:end] for task in probabilities])
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

    def get(self, version: ModelVersion) -> LoadedModel:
        labels = (version.model.name, version.id)
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
            )
            model.batcher = Batcher(
                model,
                max_size=self.settings.batch_max_size,
                max_delay=self.settings.batch_max_delay_ms / 1000,
                queue_size=self.settings.batch_queue_size,
                metrics=self.metrics,
            )
            self.metrics.cache_loads.labels(*labels).inc()
            logger.info("loaded %s (%s, %d bytes)", version.id, model.backend, model.nbytes)
            with self._lock:
                self._loaded[version.id] = model
                self._shrink()
                self._loading.pop(version.id, None)
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
        self.metrics.cache_evictions.labels(model.name, model.version_id).inc()
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


def decode_images(
    model: LoadedModel, images: list[tuple[str, bytes | None]], *, limits: IngestLimits
) -> tuple[list[ImagePrediction], list[int], torch.Tensor | None]:
    """Per-image results (errors filled in), the indexes that decoded, and their batch.

    An entry whose bytes are None was already found unreadable (bad base64)."""
    results = [ImagePrediction(image=name) for name, _ in images]
    good: list[int] = []
    tensors: list[torch.Tensor] = []
    for index, (_, data) in enumerate(images):
        if data is None:
            results[index].error = ImageError(
                code="invalid_base64", message="`data` is not valid base64."
            )
            continue
        try:
            tensors.append(model.prepare(open_image(io.BytesIO(data), limits)))
            good.append(index)
        except ImageRejectedError as exc:
            results[index].error = ImageError(code=exc.code, message=exc.reason)
    return results, good, (torch.stack(tensors) if tensors else None)


def fill_predictions(
    model: LoadedModel,
    results: list[ImagePrediction],
    good: list[int],
    probabilities: list[np.ndarray],
    *,
    task: str,
    top_k: int,
) -> None:
    labels = model.tasks[task]
    rows = probabilities[list(model.tasks).index(task)]
    k = max(1, min(top_k, len(labels)))
    for index, row in zip(good, rows, strict=True):
        top = np.argsort(-row, kind="stable")[:k]
        results[index].top = [LabelScore(label=labels[i], probability=float(row[i])) for i in top]
