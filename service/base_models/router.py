from typing import Any

from fastapi import APIRouter

from service.deps import ContextDep, TenantDep
from worker import engine

router = APIRouter(prefix="/v1/base-models", tags=["base-models"])


@router.get(
    "",
    summary="The zoo: backbones you can start from",
    description="Per base model: source, whether its pretrained weights are installed here, "
    "input size, mean/std, and the layer groups with their parameter counts.",
)
def list_zoo(context: ContextDep, _tenant: TenantDep) -> dict[str, list[dict[str, Any]]]:
    return {"data": engine.list_base_models(context.settings.resolved_weights_dir)}
