"""Monitoring a version's predict traffic: recording predictions off the request path, cutting
them into windows pooled over every API process (the database is the pool), testing each
window against the version's reference profile, and the labels fed back for predictions.

A process's `Recorder` takes each answered call's outputs in constant time (a deque append) and
a background thread does the rest: the calibrated confidence and predicted label per input,
the reduced features of a sample of them, one INSERT per flush, then any window that is due, and
the inputs of a model that captures them (`capture.py`).
Monitoring never fails predict: anything that goes wrong is logged and counted
(`thaw_monitor_failures`), and the call has already been answered.
"""

import logging
import random
import threading
from collections import Counter, deque
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import case, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.context import AppContext
from service.db import utcnow
from service.errors import ApiError
from service.inference.metrics import InferenceMetrics
from service.inference.resolution import ServedVersion
from service.monitoring import statistics
from service.monitoring.capture import capture_key, enforce_bounds, flag_least_confident
from service.monitoring.reference import REFERENCE_FILE, Reference, summarise
from service.tables import ModelVersion, MonitorPrediction, MonitorWindow
from service.webhooks.outbox import VERSION_SHIFTED, emit

logger = logging.getLogger(__name__)

FLUSH_SECONDS = 0.25
"""How often a process writes what it recorded; a prediction id can be fed back after this."""
MAX_PENDING_CALLS = 10_000
"""Calls waiting to be written, at most; beyond it the oldest are dropped (and counted)."""
MAX_PENDING_CAPTURE_BYTES = 64 * 1024**2
"""Captured inputs waiting to be written, at most; beyond it a call's inputs are not kept."""


@dataclass(frozen=True)
class _Call:
    version: ServedVersion
    model: Any
    """The `LoadedModel` that answered (labels, temperatures, test-time views)."""
    prediction_ids: list[str]
    outputs: Any
    """The call's `Outputs`, rows of the inputs that were answered."""
    at: datetime
    inputs: list[bytes] | None
    """The answered inputs as sent (an image's bytes, a text as UTF-8), when the model
    captures them."""


class Recorder:
    """One per API process: records answered predictions and closes due windows."""

    def __init__(self, context: AppContext, metrics: InferenceMetrics) -> None:
        self.context = context
        self.metrics = metrics
        settings = context.settings
        self.sample_rate = settings.monitor_sample_rate
        self.window_size = settings.monitor_window_size
        self.window_age = timedelta(minutes=settings.monitor_window_minutes)
        self._pending: deque[_Call] = deque(maxlen=MAX_PENDING_CALLS)
        self._references: dict[str, Reference | None] = {}
        self._model_ids: dict[str, str] = {}
        self._pending_capture_bytes = 0
        self._capture_lock = threading.Lock()
        # One flush at a time: a flush that finds nothing pending returns only once a flush
        # already under way (the thread's) has written what it took.
        self._flush_lock = threading.Lock()
        self._random = random.Random()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)
        self._thread.start()

    def record(
        self,
        version: ServedVersion,
        model: Any,
        prediction_ids: list[str],
        outputs: Any,
        *,
        inputs: list[bytes] | None = None,
    ) -> None:
        """On the request path: constant time (inputs are kept by reference), never raises."""
        try:
            if len(self._pending) == MAX_PENDING_CALLS:
                self.metrics.monitor_failures.inc()
                self._release(self._pending.popleft())
            if inputs is not None:
                size = sum(len(data) for data in inputs)
                with self._capture_lock:
                    if self._pending_capture_bytes + size > MAX_PENDING_CAPTURE_BYTES:
                        self.metrics.capture_failures.inc(len(inputs))
                        inputs = None
                    else:
                        self._pending_capture_bytes += size
            self._pending.append(_Call(version, model, prediction_ids, outputs, utcnow(), inputs))
        except Exception:
            logger.exception("monitoring could not record a predict call")

    def flush(self) -> None:
        """Write what is pending and close due windows now (tests; the thread does it too)."""
        with self._flush_lock:
            self._flush()

    def _flush(self) -> None:
        calls: list[_Call] = []
        while self._pending:
            calls.append(self._pending.popleft())
            self._release(calls[-1])
        if not calls:
            return
        capturing: set[str] = set()
        try:
            rows = []
            for call in calls:
                answered = self._rows(call)
                if call.inputs is not None:
                    capturing |= self._capture(call, answered)
                rows += answered
            with self.context.db.session() as session:
                session.add_all(rows)
                session.commit()
            for version_id in {call.version.id for call in calls}:
                self._close_due(version_id)
        except Exception:
            self.metrics.monitor_failures.inc()
            logger.exception("monitoring could not write %d predict calls", len(calls))
        for model_id in capturing:
            self._bound_captures(model_id)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)
        self.flush()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(FLUSH_SECONDS)
            self.flush()

    def reference(self, version: ServedVersion) -> Reference | None:
        if version.id not in self._references:
            path = Path(self.context.store.local_path(version.artifact_prefix)) / REFERENCE_FILE
            self._references[version.id] = Reference.load(path) if path.exists() else None
        return self._references[version.id]

    def _rows(self, call: _Call) -> list[MonitorPrediction]:
        summary = summarise(call.model, call.outputs)
        labels = list(call.model.tasks.values())[-1]
        reference = self.reference(call.version)
        reduced = None
        if reference is not None and summary.features is not None:
            reduced = reference.projection(summary.features)
        rows = []
        for index, prediction_id in enumerate(call.prediction_ids):
            probabilities = summary.probabilities[index]
            top = int(probabilities.argmax())
            kept = reduced is not None and self._random.random() < self.sample_rate
            rows.append(
                MonitorPrediction(
                    id=prediction_id,
                    version_id=call.version.id,
                    created_at=call.at,
                    predicted=labels[top],
                    confidence=float(probabilities[top]),
                    features=reduced[index].tobytes() if kept and reduced is not None else None,
                )
            )
        return rows

    def _capture(self, call: _Call, rows: list[MonitorPrediction]) -> set[str]:
        """Keep the call's inputs under its model's prefix and name them on their rows; an
        input that cannot be kept is counted and its row stays without one."""
        assert call.inputs is not None
        try:
            model_id = self._model_id(call.version.id)
        except Exception:
            self.metrics.capture_failures.inc(len(call.inputs))
            logger.exception("could not capture the inputs of version %s", call.version.id)
            return set()
        for row, data in zip(rows, call.inputs, strict=True):
            key = capture_key(model_id, row.id)
            try:
                self.context.store.put_bytes(key, data)
            except Exception:
                self.metrics.capture_failures.inc()
                logger.exception("could not capture the input of prediction %s", row.id)
                continue
            row.input_key, row.input_bytes = key, len(data)
        return {model_id}

    def _release(self, call: _Call) -> None:
        if call.inputs is not None:
            with self._capture_lock:
                self._pending_capture_bytes -= sum(len(data) for data in call.inputs)

    def _model_id(self, version_id: str) -> str:
        if version_id not in self._model_ids:
            with self.context.db.session() as session:
                self._model_ids[version_id] = session.get_one(ModelVersion, version_id).model_id
        return self._model_ids[version_id]

    def _bound_captures(self, model_id: str) -> None:
        settings = self.context.settings
        try:
            with self.context.db.session() as session:
                enforce_bounds(
                    session,
                    self.context.store,
                    model_id=model_id,
                    max_items=settings.capture_max_items,
                    max_bytes=settings.capture_max_bytes,
                )
        except Exception:
            self.metrics.capture_failures.inc()
            logger.exception("could not bound the captured inputs of model %s", model_id)

    def _close_due(self, version_id: str) -> None:
        with self.context.db.session() as session:
            served = session.get(ModelVersion, version_id)
            if served is None:
                return
            reference = self.reference(ServedVersion.of(served))
            least_confident = served.model.capture_least_confident
            while True:
                window = close_window(
                    session,
                    version_id=version_id,
                    reference=reference,
                    size=self.window_size,
                    max_age=self.window_age,
                    now=utcnow(),
                    least_confident=least_confident,
                )
                if window is None:
                    return
                self._publish(window)

    def _publish(self, window: MonitorWindow) -> None:
        labels = (window.version_id,)
        if window.score is not None and window.p_value is not None:
            self.metrics.shift_score.labels(*labels).set(window.score)
            self.metrics.shift_p_value.labels(*labels).set(window.p_value)
            self.metrics.shifted.labels(*labels).set(1 if window.shifted else 0)
        if window.estimated_accuracy is not None:
            self.metrics.estimated_accuracy.labels(*labels).set(window.estimated_accuracy)


def close_window(
    session: Session,
    *,
    version_id: str,
    reference: Reference | None,
    size: int,
    max_age: timedelta,
    now: datetime,
    seed: int | None = None,
    least_confident: int = 0,
) -> MonitorWindow | None:
    """Close the version's next window when it is due (`size` predictions not yet in a window,
    or the oldest of them older than `max_age`), test it, flag its `least_confident` least
    confident captured inputs and commit; None when none is due or another process closed it
    first. Rows are claimed with SKIP LOCKED on Postgres (SQLite
    serialises writers), so each prediction lands in one window."""
    rows = list(
        session.scalars(
            select(MonitorPrediction)
            .where(
                MonitorPrediction.version_id == version_id, MonitorPrediction.window_id.is_(None)
            )
            .order_by(MonitorPrediction.created_at, MonitorPrediction.id)
            .limit(size)
            .with_for_update(skip_locked=True)
        )
    )
    if not rows or (len(rows) < size and now - rows[0].created_at < max_age):
        session.rollback()
        return None
    last = session.scalar(
        select(func.max(MonitorWindow.seq)).where(MonitorWindow.version_id == version_id)
    )
    window = MonitorWindow(
        version_id=version_id,
        seq=(last or 0) + 1,
        start=rows[0].created_at,
        end=rows[-1].created_at,
        count=len(rows),
        **window_statistics(rows, reference, seed=seed),
    )
    session.add(window)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()  # another process wrote this window number first
        return None
    for row in rows:
        row.window_id = window.id
        row.features = None  # tested: nothing of it is kept but the answer
    flag_least_confident(rows, count=least_confident)
    if window.shifted:
        _announce_shift(session, window=window)
    session.commit()
    return window


def _announce_shift(session: Session, *, window: MonitorWindow) -> None:
    """A `version.shifted` event for the tenant's webhook, in the window's transaction."""
    version = session.get_one(ModelVersion, window.version_id)
    data = {
        "model": version.model.name,
        "version": version.version,
        "window": window.seq,
        "start": window.start.isoformat(),
        "end": window.end.isoformat(),
        "count": window.count,
        "score": window.score,
        "p_value": window.p_value,
        "estimated_accuracy": window.estimated_accuracy,
    }
    emit(session, tenant_id=version.model.tenant_id, event=VERSION_SHIFTED, data=data)


def window_statistics(
    rows: list[MonitorPrediction], reference: Reference | None, *, seed: int | None = None
) -> dict[str, Any]:
    """A window's columns: the shift test of its sampled features against the reference, the
    class and confidence shifts, and the accuracy its calibrated confidences promise."""
    confidences = np.array([row.confidence for row in rows])
    frequencies = Counter(row.predicted for row in rows)
    details: dict[str, Any] = {
        "class_frequencies": {label: count / len(rows) for label, count in frequencies.items()},
        "mean_confidence": float(confidences.mean()),
    }
    features = [np.frombuffer(row.features, dtype=np.float32) for row in rows if row.features]
    result: dict[str, Any] = {
        "sampled": len(features),
        "score": None,
        "p_value": None,
        "shifted": None,
        "estimated_accuracy": statistics.expected_accuracy(confidences),
        "details": details,
    }
    if reference is None:
        return result
    index = {label: i for i, label in enumerate(reference.labels)}
    counts = np.zeros(len(reference.labels))
    for label, count in frequencies.items():
        if label in index:
            counts[index[label]] = count
    classes = statistics.class_shift(reference.class_counts, counts)
    confidence = statistics.confidence_shift(reference.confidences, confidences)
    details["class_shift"] = {"score": classes.score, "p_value": classes.p_value}
    details["confidence_shift"] = {"score": confidence.score, "p_value": confidence.p_value}
    if len(features) >= 2:
        test = statistics.mmd_test(
            reference.features,
            np.stack(features),
            bandwidth=reference.bandwidth,
            seed=seed if seed is not None else random.randrange(2**32),
        )
        result |= {
            "score": test.score,
            "p_value": test.p_value,
            "shifted": test.p_value < statistics.SIGNIFICANCE,
        }
    return result


def observed_accuracies(session: Session, *, window_ids: list[str]) -> dict[str, tuple[float, int]]:
    """Per window, the accuracy on the predictions that were fed a label, and how many were."""
    correct = func.sum(case((MonitorPrediction.label == MonitorPrediction.predicted, 1), else_=0))
    rows = session.execute(
        select(MonitorPrediction.window_id, correct, func.count())
        .where(MonitorPrediction.window_id.in_(window_ids), MonitorPrediction.label.is_not(None))
        .group_by(MonitorPrediction.window_id)
    )
    return {window_id: (float(right) / total, total) for window_id, right, total in rows}


def windows_of(session: Session, *, version: ModelVersion, limit: int) -> list[dict[str, Any]]:
    """The version's latest `limit` windows, oldest first, with observed accuracy."""
    windows = list(
        session.scalars(
            select(MonitorWindow)
            .where(MonitorWindow.version_id == version.id)
            .order_by(MonitorWindow.seq.desc())
            .limit(limit)
        )
    )[::-1]
    observed = observed_accuracies(session, window_ids=[window.id for window in windows])
    out = []
    for window in windows:
        accuracy, labelled = observed.get(window.id, (None, 0))
        out.append(
            {
                "seq": window.seq,
                "start": window.start,
                "end": window.end,
                "count": window.count,
                "sampled": window.sampled,
                "score": window.score,
                "p_value": window.p_value,
                "shifted": window.shifted,
                "estimated_accuracy": window.estimated_accuracy,
                "observed_accuracy": accuracy,
                "labelled": labelled,
                **window.details,
            }
        )
    return out


def give_feedback(session: Session, *, version: ModelVersion, labels: list[tuple[str, str]]) -> int:
    """Record the true label of each (prediction id, label); a 404 names the first id that is
    not this version's prediction, a 422 the first label the version does not know. All or
    nothing."""
    known = set(version.labels)
    ids = [prediction_id for prediction_id, _ in labels]
    found = {
        row.id: row
        for row in session.scalars(
            select(MonitorPrediction).where(
                MonitorPrediction.id.in_(ids), MonitorPrediction.version_id == version.id
            )
        )
    }
    now = utcnow()
    for prediction_id, label in labels:
        row = found.get(prediction_id)
        if row is None:
            raise ApiError(
                404,
                "prediction_not_found",
                f"Version {version.version} made no prediction {prediction_id!r} (or it is "
                f"not recorded yet: predictions are written within {FLUSH_SECONDS} s).",
                param="prediction_id",
            )
        if label not in known:
            raise ApiError(
                422,
                "unknown_label",
                f"label: {label!r} is not one of this version's labels.",
                param="label",
            )
        row.label = label
        row.labelled_at = now
    session.commit()
    return len(labels)
