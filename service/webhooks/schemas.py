from datetime import datetime

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field

from service.bounds import RequestBody
from service.webhooks.outbox import EVENTS


class WebhookIn(RequestBody):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"url": "https://hooks.example.com/thaw"}]}
    )

    url: AnyHttpUrl = Field(
        max_length=2000, description="Where thaw POSTs this tenant's events (http or https)."
    )


class DeliveriesOut(BaseModel):
    pending: int = Field(description="Events waiting to be sent, or retried.")
    delivered: int
    failed: int = Field(description="Events given up on after every attempt.")
    last_error: str | None = Field(description="The latest failed attempt's error.")


class WebhookOut(BaseModel):
    url: str
    events: list[str] = Field(default=list(EVENTS), description="The events sent.")
    created_at: datetime = Field(description="When the URL and secret were set.")
    deliveries: DeliveriesOut = Field(description="The last seven days' events.")


class WebhookCreated(WebhookOut):
    secret: str = Field(
        description="Signs every delivery (`Thaw-Signature`). Shown only now: keep it; setting "
        "the webhook again makes a new one."
    )
