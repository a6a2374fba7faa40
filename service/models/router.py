from collections.abc import Iterator
from dataclasses import replace
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import StreamingResponse

from service.bounds import ALIAS_PATTERN
from service.deps import ContextDep, ModelDep, SessionDep, TenantDep, VersionDep
from service.errors import ApiError, echo
from service.models.export import ensure_export
from service.models.schemas import (
    AliasIn,
    AliasOut,
    ModelOut,
    ModelPatch,
    VersionDetail,
    VersionOut,
    VersionPatch,
)
from service.models.service import (
    METRIC_FILTER_PATTERN,
    ORDER_PATTERN,
    VersionFilters,
    delete_alias,
    delete_model,
    delete_version,
    model_out,
    models_query,
    parse_metric_filter,
    parse_order,
    search_versions,
    set_alias,
    set_capture,
    set_model_tags,
    update_version,
    version_detail,
    version_out,
)
from service.pagination import Page, PageParams, page_params, paginate
from service.storage import ArtifactStore
from service.tables import RegisteredModel

router = APIRouter(prefix="/v1/models", tags=["models"])
search_router = APIRouter(prefix="/v1/model-versions", tags=["models"])

PageDep = Annotated[PageParams, Depends(page_params)]
AliasPath = Annotated[
    str,
    Path(
        pattern=f"^{ALIAS_PATTERN}$",
        description="Alias name such as `production`: lowercase, starting with a letter (so "
        "it can never be mistaken for a version number).",
    ),
]


def version_filters(
    base_model: Annotated[str | None, Query(description="Zoo name, e.g. `resnet18`.")] = None,
    dataset: Annotated[str | None, Query(description="Dataset id the version trained on.")] = None,
    strategy: Annotated[str | None, Query(description="e.g. `fine_tune`.")] = None,
    tag: Annotated[
        list[str] | None,
        Query(description="Carried by the version or its model; repeat to require several."),
    ] = None,
    metric: Annotated[
        list[str] | None,
        Query(
            description="Metric condition `<name><op><number>`, op one of >=, <=, >, <, =; "
            "repeat to require several. Example: `val_accuracy>=0.9`.",
            # Documented, not enforced here: parse_metric_filter explains a mismatch better.
            json_schema_extra={"items": {"type": "string", "pattern": METRIC_FILTER_PATTERN}},
        ),
    ] = None,
    order: Annotated[
        str,
        Query(
            description="`created_at`, `version` or a metric name; `-` first for descending. "
            "Versions without the metric come last.",
            json_schema_extra={"pattern": ORDER_PATTERN},
        ),
    ] = "created_at",
    include_archived: Annotated[bool, Query(description="Also list archived versions.")] = False,
) -> VersionFilters:
    return VersionFilters(
        base_model=base_model,
        dataset=dataset,
        strategy=strategy,
        tags=tag or [],
        metrics=[parse_metric_filter(text) for text in metric or []],
        include_archived=include_archived,
        order=parse_order(order),
    )


FiltersDep = Annotated[VersionFilters, Depends(version_filters)]


@router.get("", summary="List registered models")
def list_models(
    session: SessionDep,
    tenant: TenantDep,
    params: PageDep,
    tag: Annotated[str | None, Query(description="Only models with this tag.")] = None,
) -> Page[ModelOut]:
    rows, has_more, last_id = paginate(
        session, models_query(tenant=tenant, tag=tag), RegisteredModel.id, params
    )
    return Page(
        data=[model_out(session, model=m) for m in rows], has_more=has_more, last_id=last_id
    )


@search_router.get(
    "",
    summary="Search versions across your models",
    description="Filter by base model, dataset, strategy, tags and metric conditions, in any "
    "order. `?metric=val_accuracy>=0.9&order=-val_accuracy&tag=shoes`",
)
def search_all_versions(
    session: SessionDep,
    tenant: TenantDep,
    filters: FiltersDep,
    params: PageDep,
    model: Annotated[str | None, Query(description="Only this model's versions.")] = None,
) -> Page[VersionOut]:
    if model is not None:
        filters = replace(filters, model=model)
    rows, has_more, last_id = search_versions(
        session, tenant=tenant, filters=filters, params=params
    )
    return Page(
        data=[version_out(session, version=v) for v in rows], has_more=has_more, last_id=last_id
    )


@router.get("/{name}", summary="Show a model")
def get_model(model: ModelDep, session: SessionDep) -> ModelOut:
    return model_out(session, model=model)


@router.patch(
    "/{name}",
    summary="Set a model's tags, or its input capture (on, off, least confident kept)",
)
def patch_model(model: ModelDep, body: ModelPatch, session: SessionDep) -> ModelOut:
    if body.tags is not None:
        set_model_tags(session, model=model, tags=body.tags)
    if body.capture is not None or body.capture_least_confident is not None:
        set_capture(
            session,
            model=model,
            capture=body.capture,
            least_confident=body.capture_least_confident,
        )
    return model_out(session, model=model)


@router.delete(
    "/{name}",
    status_code=204,
    summary="Delete a model with no versions left (409 while it has any)",
)
def remove_model(model: ModelDep, session: SessionDep) -> Response:
    delete_model(session, model=model)
    return Response(status_code=204)


@router.get("/{name}/versions", summary="List and filter a model's versions")
def list_versions(
    model: ModelDep,
    session: SessionDep,
    tenant: TenantDep,
    filters: FiltersDep,
    params: PageDep,
) -> Page[VersionOut]:
    filters = replace(filters, model=model.name)
    rows, has_more, last_id = search_versions(
        session, tenant=tenant, filters=filters, params=params
    )
    return Page(
        data=[version_out(session, version=v) for v in rows], has_more=has_more, last_id=last_id
    )


@router.get(
    "/{name}/versions/{version}",
    summary="Show a version: metrics, history, lineage, artifacts",
)
def get_version(version: VersionDep, session: SessionDep) -> VersionDetail:
    return version_detail(session, version=version)


@router.patch(
    "/{name}/versions/{version}",
    summary="Set a version's tags, archive or unarchive it",
)
def patch_version(version: VersionDep, body: VersionPatch, session: SessionDep) -> VersionDetail:
    update_version(session, version=version, tags=body.tags, archived=body.archived)
    return version_detail(session, version=version)


@router.delete(
    "/{name}/versions/{version}",
    status_code=204,
    summary="Delete a version and its artifacts (409 while an alias points at it)",
    description="The version number is never reused; the model stays, even when this was "
    "its last version (delete it with `DELETE /v1/models/{name}`).",
)
def remove_version(
    request: Request, version: VersionDep, session: SessionDep, context: ContextDep
) -> Response:
    version_id = version.id
    delete_version(session, store=context.store, version=version)
    request.app.state.predictors.evict(version_id)
    return Response(status_code=204)


@router.put(
    "/{name}/aliases/{alias}",
    summary="Point an alias (e.g. `production`) at a version, creating or moving it",
)
def put_alias(model: ModelDep, alias: AliasPath, body: AliasIn, session: SessionDep) -> AliasOut:
    return set_alias(session, model=model, alias=alias, version_number=body.version)


@router.delete("/{name}/aliases/{alias}", status_code=204, summary="Delete an alias")
def remove_alias(model: ModelDep, alias: AliasPath, session: SessionDep) -> Response:
    delete_alias(session, model=model, alias=alias)
    return Response(status_code=204)


@router.get(
    "/{name}/versions/{version}/artifacts/{artifact}",
    summary="Download an artifact",
    description="`weights.safetensors`, `config.json`, `labels.json`, `card.md`, and "
    "`model.onnx` when the export passed its parity check; the version's `artifacts` lists "
    "each with its size and SHA-256.",
    response_class=StreamingResponse,
)
def download_artifact(version: VersionDep, artifact: str, context: ContextDep) -> StreamingResponse:
    if artifact not in {a["name"] for a in version.artifacts}:
        raise ApiError(
            404, "artifact_not_found", f"Version has no artifact {echo(artifact)}.", "artifact"
        )
    key = f"{version.artifact_prefix}/{artifact}"
    size = context.store.stat(key).size
    return StreamingResponse(
        stream_object(context.store, key),
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(size),
            "Content-Disposition": f'attachment; filename="{artifact}"',
        },
    )


@router.get(
    "/{name}/versions/{version}/export",
    summary="Export a version for another serving stack (a zip)",
    description="`triton`: a Triton model repository entry (`config.pbtxt`, `labels.txt`, "
    "`1/model.onnx`); `mlflow`: an MLflow model (`onnx` and `python_function` flavors); `hf` "
    "(text versions): a Hugging Face folder for `AutoModelForSequenceClassification."
    "from_pretrained(folder, trust_remote_code=True)`. Built on the first request and kept "
    "with the version's artifacts; 409 when the version cannot be exported so.\n\n"
    "`curl -H 'Authorization: Bearer $KEY' -o digits-triton.zip "
    "'.../v1/models/digits/versions/production/export?format=triton'`",
    response_class=StreamingResponse,
)
def export_version(
    version: VersionDep,
    context: ContextDep,
    export_format: Annotated[
        Literal["triton", "mlflow", "hf"], Query(alias="format", description="The target.")
    ],
) -> StreamingResponse:
    key = ensure_export(context.store, version=version, fmt=export_format)
    filename = f"{version.model.name}-v{version.version}-{export_format}.zip"
    return StreamingResponse(
        stream_object(context.store, key),
        media_type="application/zip",
        headers={
            "Content-Length": str(context.store.stat(key).size),
            "Content-Disposition": f'attachment; filename="{filename}"',
        },
    )


def stream_object(store: ArtifactStore, key: str) -> Iterator[bytes]:
    """The object a chunk at a time, straight from the store (no copy on the API's disk)."""
    with store.open(key) as stream:
        yield from iter(lambda: stream.read(1 << 20), b"")
