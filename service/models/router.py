from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse
from sqlalchemy import select

from service.deps import ContextDep, ModelDep, SessionDep, TenantDep, VersionDep
from service.errors import ApiError
from service.models.schemas import ModelOut, VersionOut
from service.models.service import model_out, version_out
from service.pagination import Page, PageParams, page_params, paginate
from service.tables import ModelVersion, RegisteredModel

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", summary="List registered models")
def list_models(
    session: SessionDep, tenant: TenantDep, params: Annotated[PageParams, Depends(page_params)]
) -> Page[ModelOut]:
    query = select(RegisteredModel).where(RegisteredModel.tenant_id == tenant.id)
    rows, has_more, last_id = paginate(session, query, RegisteredModel.id, params)
    return Page(
        data=[model_out(session, model=m) for m in rows], has_more=has_more, last_id=last_id
    )


@router.get("/{name}", summary="Show a model")
def get_model(model: ModelDep, session: SessionDep) -> ModelOut:
    return model_out(session, model=model)


@router.get("/{name}/versions", summary="List a model's versions")
def list_versions(
    model: ModelDep, session: SessionDep, params: Annotated[PageParams, Depends(page_params)]
) -> Page[VersionOut]:
    query = select(ModelVersion).where(ModelVersion.model_id == model.id)
    rows, has_more, last_id = paginate(session, query, ModelVersion.id, params)
    return Page(
        data=[version_out(session, version=v) for v in rows], has_more=has_more, last_id=last_id
    )


@router.get(
    "/{name}/versions/{version}",
    summary="Show a version: metrics, lineage, artifacts",
)
def get_version(version: VersionDep, session: SessionDep) -> VersionOut:
    return version_out(session, version=version)


@router.get(
    "/{name}/versions/{version}/artifacts/{artifact}",
    summary="Download an artifact (weights.safetensors, config.json)",
    response_class=FileResponse,
)
def download_artifact(version: VersionDep, artifact: str, context: ContextDep) -> FileResponse:
    if artifact not in {a["name"] for a in version.artifacts}:
        raise ApiError(
            404, "artifact_not_found", f"Version has no artifact {artifact!r}.", "artifact"
        )
    path = context.store.local_path(f"{version.artifact_prefix}/{artifact}")
    return FileResponse(path, filename=artifact)
