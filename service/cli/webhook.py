"""Client commands for this tenant's webhook: set, show, delete."""

from typing import Annotated, Any

import typer

from service.cli.client import (
    DEFAULT_URL,
    JsonOption,
    KeyOption,
    UrlOption,
    client_session,
    print_json,
    table,
)

webhook_app = typer.Typer(
    help="Where this tenant's events (version.shifted, job.succeeded, job.failed, "
    "update.ready) are POSTed, signed (client)."
)


def _show(webhook: Any, *, secret: str | None) -> None:
    deliveries = webhook.deliveries
    rows = [
        ["url", webhook.url],
        ["events", ", ".join(webhook.events)],
        ["set", f"{webhook.created_at:%Y-%m-%d %H:%M}"],
        ["pending", deliveries.pending],
        ["delivered", deliveries.delivered],
        ["failed", deliveries.failed],
        ["last error", deliveries.last_error],
    ]
    if secret is not None:
        rows.append(["secret (shown once)", secret])
    table("webhook", ["", ""], rows)


@webhook_app.command("set")
def webhook_set(
    target: Annotated[str, typer.Argument(metavar="URL", help="http or https.")],
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Send this tenant's events to URL, signed with a new secret that is printed only now."""
    with client_session(url, api_key) as client:
        webhook = client.set_webhook(target)
    if as_json:
        print_json(webhook)
    else:
        _show(webhook, secret=webhook.secret)


@webhook_app.command("show")
def webhook_show(
    url: UrlOption = DEFAULT_URL, api_key: KeyOption = None, as_json: JsonOption = False
) -> None:
    """This tenant's webhook and its last seven days' deliveries (never the secret)."""
    with client_session(url, api_key) as client:
        webhook = client.get_webhook()
    if as_json:
        print_json(webhook)
    else:
        _show(webhook, secret=None)


@webhook_app.command("delete")
def webhook_delete(url: UrlOption = DEFAULT_URL, api_key: KeyOption = None) -> None:
    """Stop sending events; those still pending are dropped."""
    with client_session(url, api_key) as client:
        client.delete_webhook()
    typer.echo("webhook deleted")
