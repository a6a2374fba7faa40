from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request
from sqlalchemy import select

from service.bounds import MAX_SEED
from service.datasets import service
from service.datasets.ingest import SNIFF_BYTES
from service.datasets.schemas import (
    TRANSFERABILITY_EXAMPLE,
    DatasetOut,
    TokenLengthsOut,
    TransferabilityIn,
    TransferabilityOut,
)
from service.db import new_id
from service.deps import ContextDep, DatasetDep, SessionDep, TenantDep
from service.pagination import Page, PageParams, page_params, paginate
from service.tables import Dataset
from service.uploads import receive_upload

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                # Files cannot be shown inline: curl sends one with -F file=@digits.zip.
                "example": {"name": "digits", "val_fraction": 0.2, "seed": 0},
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "Images: a zip or tar(.gz/.bz2/.xz) with one folder "
                            "per class, or images plus a CSV manifest (`path,label`) at the root. "
                            "Texts: a CSV with a header (columns `text` and `label`), JSON Lines "
                            '(`{"text": ..., "label": ...}`), or an archive of one folder of '
                            "`.txt` files per class. The kind is recognised by content.",
                        },
                        "text_column": {
                            "type": "string",
                            "default": "text",
                            "description": "CSV / JSON Lines: the field that holds the text.",
                        },
                        "label_column": {
                            "type": "string",
                            "default": "label",
                            "description": "CSV / JSON Lines: the field that holds the label.",
                        },
                        "unlabelled": {
                            "type": "string",
                            "enum": ["keep", "skip"],
                            "default": "keep",
                            "description": "Texts without a label: kept as unlabelled texts "
                            "(for `ulmfit`'s language-model stage) or skipped and reported.",
                        },
                        "name": {
                            "type": "string",
                            "maxLength": 200,
                            "description": "Default: the file name.",
                        },
                        "val_fraction": {
                            "type": "number",
                            "default": 0.2,
                            "exclusiveMinimum": 0,
                            "exclusiveMaximum": 0.9,
                            "description": "Share of each class held out for validation.",
                        },
                        "seed": {
                            "type": "integer",
                            "default": 0,
                            "minimum": 0,
                            "maximum": MAX_SEED,
                            "description": "Seed of the train/validation split.",
                        },
                    },
                },
            }
        },
    }
}


@router.post(
    "",
    status_code=202,
    summary="Upload a dataset: an image archive, or texts (CSV, JSON Lines, .txt folders)",
    description="Streams the upload to storage and answers at once; extraction and validation "
    "run in the background. Poll `GET /v1/datasets/{id}` until `status` is `ready`. An upload "
    "that is none of the supported kinds is a 415; a CSV without the text or label column a "
    "422.\n\n"
    "`curl -H 'Authorization: Bearer $KEY' -F file=@pets.zip -F name=pets .../v1/datasets`",
    openapi_extra=UPLOAD_BODY,
)
async def upload_dataset(request: Request, context: ContextDep, tenant: TenantDep) -> DatasetOut:
    dataset_id = new_id("ds")
    upload = await receive_upload(
        request,
        file_field="file",
        max_bytes=context.settings.max_upload_bytes,
        store=context.store,
        key=service.archive_key(dataset_id),
        head_bytes=SNIFF_BYTES,
    )
    dataset = service.create_dataset(
        context=context, tenant=tenant, dataset_id=dataset_id, upload=upload
    )
    return DatasetOut.model_validate(dataset)


@router.get("", summary="List datasets")
def list_datasets(
    session: SessionDep, tenant: TenantDep, params: Annotated[PageParams, Depends(page_params)]
) -> Page[DatasetOut]:
    query = select(Dataset).where(Dataset.tenant_id == tenant.id)
    rows, has_more, last_id = paginate(session, query, Dataset.id, params)
    return Page(
        data=[DatasetOut.model_validate(r) for r in rows], has_more=has_more, last_id=last_id
    )


@router.get("/{dataset_id}", summary="Show a dataset: status, classes, counts, skipped files")
def get_dataset(
    dataset: DatasetDep,
    context: ContextDep,
    base_model: Annotated[
        str | None,
        Query(
            max_length=200,
            description="Text datasets: report token lengths against this text model.",
        ),
    ] = None,
) -> DatasetOut:
    shown = DatasetOut.model_validate(dataset)
    if base_model is not None:
        lengths = service.token_lengths_for(context=context, dataset=dataset, base_model=base_model)
        shown.token_lengths = TokenLengthsOut.model_validate(lengths)
    return shown


@router.post(
    "/{dataset_id}/transferability",
    summary="Score base models for this dataset before training (LogME, linear probe)",
    description="Runs each base model's pretrained backbone once over (a seeded, per-class "
    "sample of) the training split and scores the frozen features: LogME (You et al., ICML "
    "2021), a cross-validated linear probe, and LogME after every layer group with the freeze "
    "depth it suggests for `partial`. Answers when done, in seconds for a few hundred images "
    "per base model on a CPU; `max_images` bounds the work.",
)
def transferability(
    dataset: DatasetDep,
    context: ContextDep,
    request: Annotated[TransferabilityIn, Body(examples=[TRANSFERABILITY_EXAMPLE])],
) -> TransferabilityOut:
    return service.score_transferability(context=context, dataset=dataset, request=request)
