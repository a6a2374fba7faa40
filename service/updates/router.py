from fastapi import APIRouter

from service.deps import ContextDep, ModelDep, SessionDep, TenantDep
from service.updates.schemas import UpdateIn, UpdateOut
from service.updates.service import (
    advance,
    create_update,
    load_update,
    model_updates,
    promote,
    update_out,
)

router = APIRouter(prefix="/v1/models", tags=["updates"])


@router.post(
    "/{name}/updates",
    status_code=202,
    summary="Update a model from the labels fed back for its predictions",
    description="Takes the model's captured predictions that were fed a label (switch capture "
    'on with `PATCH /v1/models/NAME {"capture": true}`), holds out `holdout_fraction` of them '
    "per label, and trains a candidate on the rest (plus `dataset`'s items) as an ordinary job "
    "from the version: `lwf` by default, which keeps the version's task without its data. The "
    "candidate and the version are then scored on the held-out feedback and on the version's "
    "own validation items; `promote` decides whether `alias` moves. Follow it with `GET "
    ".../updates/{id}`.",
)
def post_update(
    body: UpdateIn, model: ModelDep, tenant: TenantDep, context: ContextDep, session: SessionDep
) -> UpdateOut:
    update = create_update(context=context, tenant=tenant, model=model, request=body)
    advance(context, update_id=update.id)
    return update_out(session, update=load_update(session, model=model, update_id=update.id))


@router.get("/{name}/updates", summary="A model's updates, newest first")
def list_updates(model: ModelDep, session: SessionDep) -> list[UpdateOut]:
    return [update_out(session, update=u) for u in model_updates(session, model_id=model.id)]


@router.get(
    "/{name}/updates/{update_id}",
    summary="An update: its status and, once scored, the candidate's and the version's scores",
)
def get_update(update_id: str, model: ModelDep, session: SessionDep) -> UpdateOut:
    return update_out(session, update=load_update(session, model=model, update_id=update_id))


@router.post(
    "/{name}/updates/{update_id}/promote",
    summary="Point the update's alias at its scored candidate",
)
def promote_update(update_id: str, model: ModelDep, session: SessionDep) -> UpdateOut:
    update = load_update(session, model=model, update_id=update_id)
    promote(session, update=update)
    return update_out(session, update=update)
