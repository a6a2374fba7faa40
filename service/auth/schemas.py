from pydantic import BaseModel


class Me(BaseModel):
    tenant_id: str
    tenant: str
