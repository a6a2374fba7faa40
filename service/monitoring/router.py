from typing import Annotated

from fastapi import APIRouter, Query

from service.deps import ContextDep, SessionDep, VersionDep
from service.monitoring import statistics
from service.monitoring.schemas import FeedbackIn, FeedbackOut, MonitoringOut, WindowOut
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


@router.post(
    "/{name}/versions/{version}/feedback",
    summary="Send the true labels of predictions",
    description='`{"prediction_id": "pr_...", "label": "cat"}`, or `{"feedback": [...]}` for '
    "many. An id this version did not answer (or another team's) is a 404; its window then "
    "shows the observed accuracy beside the estimate.",
)
def post_feedback(body: FeedbackIn, version: VersionDep, session: SessionDep) -> FeedbackOut:
    return FeedbackOut(recorded=give_feedback(session, version=version, labels=body.items()))
