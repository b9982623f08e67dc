"""HTTP routes for webhooks: your sandboxes' events POSTed to a URL, signed."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import Field

from corral.server.auth import WebhooksDep
from corral.server.schemas import Request

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


class CreateWebhook(Request):
    url: str = Field(description="a public http(s) URL")
    events: list[str] | None = Field(
        None, description="sandbox.state and/or sandbox.egress_denied (default: both)"
    )


@router.post("", status_code=201)
async def create_webhook(body: CreateWebhook, webhooks: WebhooksDep) -> dict[str, Any]:
    """Register a URL for your sandboxes' events; the answer has its `secret`, once: check each
    delivery's `Corral-Signature` with it (see docs/observability.md)."""
    hook, secret = await webhooks.create(body.url, body.events)
    return {**hook.to_dict(), "secret": secret}


@router.get("")
async def list_webhooks(webhooks: WebhooksDep) -> list[dict[str, Any]]:
    """Your webhooks (never their secrets)."""
    return [hook.to_dict() for hook in await webhooks.list()]


@router.delete("/{webhook_id}")
async def delete_webhook(webhook_id: str, webhooks: WebhooksDep) -> dict[str, Any]:
    """Stop sending events to a webhook; events still queued for it are dropped."""
    return (await webhooks.delete(webhook_id)).to_dict()
