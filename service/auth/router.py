from fastapi import APIRouter

from service.auth.schemas import Me
from service.deps import TenantDep

router = APIRouter(prefix="/v1", tags=["auth"])


@router.get("/me", summary="The tenant your API key belongs to")
def me(tenant: TenantDep) -> Me:
    return Me(tenant_id=tenant.id, tenant=tenant.name)
