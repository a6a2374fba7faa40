from typing import Annotated

from fastapi import APIRouter, Query, Response

from service.deps import ContextDep, ModelDep, SessionDep, VersionDep
from service.monitoring import statistics
from service.monitoring.capture import captured_inputs, delete_captures, summarise
from service.monitoring.plots import monitoring_svg
from service.monitoring.schemas import (
    CapturedOut,
    CapturesOut,
    FeedbackIn,
    FeedbackOut,
    MonitoringOut,
    WindowOut,
)
from service.monitoring.service import give_feedback, windows_of

router = APIRouter(prefix="/v1/models", tags=["monitoring"])


@router.get(
    "/{name}/versions/{version}/monitoring",
    summary="A version's predict traffic, window by window: shift and estimated accuracy",
    description="Each window of `THAW_MONITOR_WINDOW_SIZE` predictions (pooled over every API "
    "process) is tested against the version's reference profile: an MMD permutation test on "
    "reduced backbone features, predicted-label frequencies and confidences; its accuracy is "
    "estimated from calibrated confidences and, where labels were fed back, observed.",
)
def get_monitoring(
    version: VersionDep,
    session: SessionDep,
    context: ContextDep,
    limit: Annotated[int, Query(ge=1, le=1000, description="The latest windows shown.")] = 100,
) -> MonitoringOut:
    profile = (version.exports or {}).get("monitoring") or {
        "reference": False,
        "reason": "published before monitoring: no reference profile",
    }
    return MonitoringOut(
        model=version.model.name,
        version=version.version,
        reference=bool(profile.get("reference")),
        reason=profile.get("reason"),
        significance=statistics.SIGNIFICANCE,
        window_size=context.settings.monitor_window_size,
        validation_accuracy=profile.get("validation_accuracy"),
        validation_expected_accuracy=profile.get("validation_expected_accuracy"),
        windows=[
            WindowOut.model_validate(window)
            for window in windows_of(session, version=version, limit=limit)
        ],
    )


@router.get(
    "/{name}/versions/{version}/plots/monitoring.svg",
    summary="The shift score and estimated vs observed accuracy per window, shifted shaded",
    response_class=Response,
    responses={200: {"description": "An SVG image.", "content": {"image/svg+xml": {}}}},
)
def monitoring_plot(
    version: VersionDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000, description="The latest windows drawn.")] = 100,
) -> Response:
    profile = (version.exports or {}).get("monitoring") or {}
    svg = monitoring_svg(
        windows_of(session, version=version, limit=limit),
        title=f"{version.model.name} v{version.version} · predict traffic",
        validation_accuracy=profile.get("validation_accuracy"),
    )
    return Response(svg, media_type="image/svg+xml", headers={"Cache-Control": "no-store"})


@router.post(
    "/{name}/versions/{version}/feedback",
    summary="Send the true labels of predictions",
    description='`{"prediction_id": "pr_...", "label": "cat"}`, or `{"feedback": [...]}` for '
    "many. An id this version did not answer (or another team's) is a 404; its window then "
    "shows the observed accuracy beside the estimate.",
)
def post_feedback(body: FeedbackIn, version: VersionDep, session: SessionDep) -> FeedbackOut:
    return FeedbackOut(recorded=give_feedback(session, version=version, labels=body.items()))


@router.get(
    "/{name}/captures",
    summary="What the model's input capture keeps",
    description='Switch capture on with `PATCH /v1/models/NAME {"capture": true}`: predict '
    "then keeps each answered input (bounded per model, the oldest unlabelled going first), so "
    "that the labels fed back for predictions can train an update (`POST .../updates`). With "
    '`{"capture_least_confident": N}` the least confident N inputs of each monitoring window '
    "are flagged `low_confidence`: listed first here, the items most worth labelling.",
)
def get_captures(
    model: ModelDep,
    session: SessionDep,
    context: ContextDep,
    limit: Annotated[int, Query(ge=0, le=1000, description="Kept inputs listed.")] = 100,
    low_confidence: Annotated[
        bool, Query(description="List only the inputs flagged least confident.")
    ] = False,
) -> CapturesOut:
    kept = summarise(session, model_id=model.id)
    settings = context.settings
    listed = captured_inputs(
        session, model_id=model.id, low_confidence_only=low_confidence, limit=limit
    )
    return CapturesOut(
        model=model.name,
        capture=model.capture,
        capture_least_confident=model.capture_least_confident,
        items=kept.items,
        bytes=kept.bytes,
        labelled=kept.labelled,
        low_confidence=kept.low_confidence,
        max_items=settings.capture_max_items,
        max_bytes=settings.capture_max_bytes,
        inputs=[CapturedOut.model_validate(item, from_attributes=True) for item in listed],
    )


@router.delete(
    "/{name}/captures",
    status_code=204,
    summary="Delete every input the model kept",
    description="Capture stays as it is set; switch it off first to keep nothing more.",
)
def remove_captures(model: ModelDep, session: SessionDep, context: ContextDep) -> Response:
    delete_captures(session, context.store, model_id=model.id)
    return Response(status_code=204)
