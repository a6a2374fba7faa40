from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from service.datasets.service import ingest_limits
from service.deps import ContextDep, VersionDep
from service.errors import ApiError
from service.inference.schemas import PredictOut
from service.inference.service import PredictorCache, predict_images

router = APIRouter(prefix="/v1/models", tags=["inference"])


@router.post(
    "/{name}/versions/{version}/predict",
    summary="Classify images with a model version",
    description="Multipart field `images`, once per image. Answers top-k labels per image, in the "
    "order sent; an image that cannot be read gets an `error` entry instead of failing the "
    "call.\n\n`curl -H 'Authorization: Bearer $KEY' -F images=@a.png -F images=@b.png "
    ".../v1/models/digits/versions/1/predict`",
)
async def predict(
    request: Request,
    version: VersionDep,
    context: ContextDep,
    images: Annotated[list[UploadFile], File(description="Images to classify.")],
    top_k: Annotated[int, Form(ge=1, le=100)] = 5,
) -> PredictOut:
    settings = context.settings
    if len(images) > settings.max_predict_images:
        raise ApiError(
            413,
            "too_many_images",
            f"At most {settings.max_predict_images} images per call.",
            param="images",
        )
    payload: list[tuple[str, bytes]] = []
    for upload in images:
        data = await upload.read(settings.max_predict_bytes + 1)
        if len(data) > settings.max_predict_bytes:
            raise ApiError(
                413,
                "image_too_large",
                f"{upload.filename} is over {settings.max_predict_bytes} bytes.",
                param="images",
            )
        payload.append((upload.filename or f"image-{len(payload)}", data))
    cache: PredictorCache = request.app.state.predictors
    # Loading and the forward pass are CPU-bound: keep them off the event loop.
    predictor = await run_in_threadpool(cache.get, version)
    predictions = await run_in_threadpool(
        predict_images, predictor, payload, top_k=top_k, limits=ingest_limits(context)
    )
    return PredictOut(model=version.model.name, version=version.version, predictions=predictions)
