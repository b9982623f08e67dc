"""HTTP route for the event stream: every state change of your sandboxes, as it happens."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from corral.server.auth import SandboxesDep
from corral.server.events import server_sent

router = APIRouter(prefix="/v1", tags=["events"])


@router.get("/events", response_class=StreamingResponse)
async def events(sandboxes: SandboxesDep, sandbox_id: str | None = None) -> StreamingResponse:
    """Server-sent events: every state change of your sandboxes (or of one), as it happens."""
    subscription = await sandboxes.events(sandbox_id)  # one not yours is a 404, here

    async def stream() -> AsyncIterator[bytes]:
        with subscription as queue:
            async for chunk in server_sent(queue, sandbox_id):
                yield chunk

    return StreamingResponse(stream(), media_type="text/event-stream")
