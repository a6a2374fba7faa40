"""A trained job's version: the engine writes its folder (`export_bundle`), the service adds
the monitoring reference, a trial's test scores and the model card; the folder is uploaded
under the attempt's own prefix, each file hashed, and the version registered by one fenced
commit. Anything short of that commit deletes the upload: nothing points at it."""

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from service.context import AppContext
from service.datasets.service import ingest_limits
from service.db import new_id
from service.jobs.history import epoch_history
from service.jobs.service import attempt_artifacts_prefix, discard_job_files
from service.jobs.states import IllegalTransitionError
from service.models.card import render_card
from service.models.service import publish_version
from service.monitoring.reference import write_reference
from service.tables import Dataset, Job
from worker import trials
from worker.engine import Plan, export_bundle
from worker.engine.artifacts import CARD_FILE
from worker.jobs.hooks import db
from worker.jobs.training import Trained

logger = logging.getLogger(__name__)


def publish(context: AppContext, *, job_id: str, attempt: int, trained: Trained) -> None:
    """Write, upload and register the trained model as the job's version."""
    version_id = new_id("mv")
    prefix = attempt_artifacts_prefix(job_id, attempt)
    export_dir = Path(tempfile.mkdtemp(dir=context.scratch_dir, prefix=f"export-{job_id}-"))
    try:
        out = export_dir / "artifacts"
        metrics, exports = _write_version(context, job_id=job_id, trained=trained, out=out)
        names = sorted(path.name for path in out.iterdir())
        context.store.put_dir(prefix, out)
    finally:
        shutil.rmtree(export_dir, ignore_errors=True)
    artifacts = [
        {
            "name": name,
            "size": context.store.size(f"{prefix}/{name}"),
            "sha256": context.store.sha256(f"{prefix}/{name}"),
        }
        for name in names
    ]

    def register(session: Session) -> None:
        publish_version(
            session,
            job_id=job_id,
            attempt=attempt,
            version_id=version_id,
            metrics=metrics,
            labels=trained.data.classes,
            artifacts=artifacts,
            artifact_prefix=prefix,
            exports=exports,
        )

    try:
        db(context, register)
    except IllegalTransitionError:
        # A retried commit may have gone through before its connection dropped.
        if db(context, lambda session: session.get_one(Job, job_id).model_version_id) != (
            version_id
        ):
            context.store.delete(prefix)
            raise
    except BaseException:
        # Nothing may point at artifacts whose version was never committed.
        context.store.delete(prefix)
        raise
    discard_job_files(context=context, job_id=job_id)
    logger.info("job %s published %s", job_id, version_id)


def _write_version(
    context: AppContext, *, job_id: str, trained: Trained, out: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The version's folder in `out`; its metrics (a trial's test scores added) and exports."""
    plan, result, data = trained.plan, trained.result, trained.data
    bundle = export_bundle(
        result,
        plan,
        out,
        classes=data.classes,
        weights_dir=context.settings.resolved_weights_dir,
        onnx=context.settings.onnx_export,
    )
    exports: dict[str, Any] = {}
    if bundle.onnx is not None:
        exports["onnx"] = bundle.onnx.to_dict()
    exports["monitoring"] = write_reference(
        out, model=result.model, train=data.train, val=data.val, limits=ingest_limits(context)
    )
    result.metrics.update(
        trials.evaluate(
            context,
            plan=plan,
            model_dir=out,
            parent_dir=trained.parent_dir,
            test=data.test,
            classes=data.classes,
            model=result.model,
        )
    )
    card = db(
        context,
        lambda session: _model_card(
            session,
            job_id=job_id,
            metrics=result.metrics,
            onnx=exports.get("onnx"),
            monitoring=exports.get("monitoring"),
        ),
    )
    (out / CARD_FILE).write_text(card)
    return result.metrics, exports


def _model_card(
    session: Session,
    *,
    job_id: str,
    metrics: dict[str, Any],
    onnx: dict[str, Any] | None,
    monitoring: dict[str, Any] | None,
) -> str:
    job = session.get_one(Job, job_id)
    dataset = session.get_one(Dataset, job.dataset_id)
    return render_card(
        model_name=job.model_name,
        job_id=job.id,
        dataset={
            "id": dataset.id,
            "name": dataset.name,
            "classes": dataset.classes,
            "class_counts": dataset.class_counts,
            "num_labelled": dataset.num_labelled,
        },
        spec=job.spec,
        plan=Plan.from_dict(job.plan),
        metrics=metrics,
        history=epoch_history(session, job_id=job.id),
        onnx=onnx,
        monitoring=monitoring,
    )
