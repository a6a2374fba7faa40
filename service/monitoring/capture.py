"""Capture: the inputs of a model's predictions, kept only while its tenant asks for it
(`capture` on the model, off by default), so that the predictions later fed a label can train
an update (`service/updates/`).

An input lives in the artifact store under its model's own prefix, `captures/<model id>/`, one
object per prediction (the bytes of an image as sent, a text as UTF-8), and its prediction's row
names the object. It is reached only through that model's routes, so never by another tenant.
Each model keeps at most `THAW_CAPTURE_MAX_ITEMS` inputs and `THAW_CAPTURE_MAX_BYTES` bytes:
beyond either, the oldest unlabelled inputs go first (a labelled one is what an update needs),
then the oldest flagged `low_confidence`, then the oldest labelled.

A model may also ask for the least confident N of each window (`capture_least_confident`):
when a window closes, those of its captured inputs are flagged `low_confidence`, the items most
worth labelling, and `GET /v1/models/NAME/captures` lists them first.
"""

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, case, func, select, update
from sqlalchemy.orm import Session

from service.storage import ArtifactStore
from service.tables import ModelVersion, MonitorPrediction

EVICT_BATCH = 500
"""Captured inputs looked at per query while a model is over its bounds."""
MAX_LEAST_CONFIDENT = 1000
"""The most least-confident inputs a model may flag per window."""


def capture_prefix(model_id: str) -> str:
    return f"captures/{model_id}"


def capture_key(model_id: str, prediction_id: str) -> str:
    return f"{capture_prefix(model_id)}/{prediction_id}"


@dataclass(frozen=True)
class CaptureSummary:
    items: int
    bytes: int
    labelled: int
    low_confidence: int


@dataclass(frozen=True)
class CapturedInput:
    prediction_id: str
    version: int
    created_at: datetime
    predicted: str
    confidence: float
    label: str | None
    bytes: int
    low_confidence: bool


def _of_model(model_id: str) -> tuple[ColumnElement[bool], ...]:
    return (
        MonitorPrediction.version_id.in_(
            select(ModelVersion.id).where(ModelVersion.model_id == model_id)
        ),
        MonitorPrediction.input_key.is_not(None),
    )


def summarise(session: Session, *, model_id: str) -> CaptureSummary:
    items, size, labelled, low = session.execute(
        select(
            func.count(),
            func.coalesce(func.sum(MonitorPrediction.input_bytes), 0),
            func.count(MonitorPrediction.label),
            func.coalesce(func.sum(case((MonitorPrediction.low_confidence, 1), else_=0)), 0),
        ).where(*_of_model(model_id))
    ).one()
    return CaptureSummary(
        items=items or 0, bytes=int(size or 0), labelled=labelled or 0, low_confidence=int(low)
    )


def captured_inputs(
    session: Session, *, model_id: str, low_confidence_only: bool, limit: int
) -> list[CapturedInput]:
    """The model's kept inputs, flagged least confident first, then the least confident."""
    rows = session.execute(
        select(MonitorPrediction, ModelVersion.version)
        .join(ModelVersion, ModelVersion.id == MonitorPrediction.version_id)
        .where(
            *_of_model(model_id),
            *((MonitorPrediction.low_confidence,) if low_confidence_only else ()),
        )
        .order_by(
            MonitorPrediction.low_confidence.desc(),
            MonitorPrediction.confidence,
            MonitorPrediction.id,
        )
        .limit(limit)
    )
    return [
        CapturedInput(
            prediction_id=row.id,
            version=version,
            created_at=row.created_at,
            predicted=row.predicted,
            confidence=row.confidence,
            label=row.label,
            bytes=row.input_bytes or 0,
            low_confidence=row.low_confidence,
        )
        for row, version in rows
    ]


def flag_least_confident(rows: list[MonitorPrediction], *, count: int) -> None:
    """Flag the `count` least confident of a closing window's rows whose input was kept."""
    kept = sorted((row for row in rows if row.input_key), key=lambda row: row.confidence)
    for row in kept[:count]:
        row.low_confidence = True


def enforce_bounds(
    session: Session, store: ArtifactStore, *, model_id: str, max_items: int, max_bytes: int
) -> int:
    """Drop the model's captured inputs beyond its bounds (oldest unlabelled first); returns how
    many went. The rows forget their object before it is deleted, so none names a missing one."""
    kept = summarise(session, model_id=model_id)
    items, size, dropped = kept.items, kept.bytes, 0
    while items > max_items or size > max_bytes:
        oldest = session.execute(
            select(MonitorPrediction.id, MonitorPrediction.input_key, MonitorPrediction.input_bytes)
            .where(*_of_model(model_id))
            .order_by(
                MonitorPrediction.label.is_not(None),
                MonitorPrediction.low_confidence,
                MonitorPrediction.created_at,
            )
            .limit(EVICT_BATCH)
        ).all()
        evicted: list[tuple[str, str]] = []
        for prediction_id, key, length in oldest:
            if items <= max_items and size <= max_bytes:
                break
            evicted.append((prediction_id, str(key)))
            items, size = items - 1, size - (length or 0)
        if not evicted:
            break
        session.execute(
            update(MonitorPrediction)
            .where(MonitorPrediction.id.in_([prediction_id for prediction_id, _ in evicted]))
            .values(input_key=None, input_bytes=None, low_confidence=False)
        )
        session.commit()
        for _, key in evicted:
            store.delete(key)
        dropped += len(evicted)
    return dropped


def delete_captures(session: Session, store: ArtifactStore, *, model_id: str) -> int:
    """Forget every input the model captured; returns how many there were."""
    count = summarise(session, model_id=model_id).items
    session.execute(
        update(MonitorPrediction)
        .where(*_of_model(model_id))
        .values(input_key=None, input_bytes=None, low_confidence=False)
    )
    session.commit()
    store.delete(capture_prefix(model_id))
    return count
