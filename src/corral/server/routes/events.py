"""HTTP route for the event stream: every state change of your sandboxes, as it happens."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from corral.server.auth import SandboxesDep

router = APIRouter(prefix="/v1", tags=["events"])
EVENT_KEEPALIVE = 15.0  # seconds between comments on a quiet event stream


@router.get("/events", response_class=StreamingResponse)
async def events(sandboxes: SandboxesDep, sandbox_id: str | None = None) -> StreamingResponse:
    """Server-sent events: every state change of your sandboxes (or of one), as it happens."""
    subscription = await sandboxes.events(sandbox_id)  # one not yours is a 404, here

    async def stream() -> AsyncIterator[bytes]:
        with subscription as queue:
            yield b": connected\n\n"
            number = 0
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), EVENT_KEEPALIVE)
                except TimeoutError:
                    yield b": keepalive\n\n"  # proxies keep the connection; clients ignore it
                    continue
                if sandbox_id is not None and event.get("sandbox_id") not in (None, sandbox_id):
                    continue
                number += 1
                data = json.dumps(event)
                yield f"id: {number}\nevent: {event['type']}\ndata: {data}\n\n".encode()

    return StreamingResponse(stream(), media_type="text/event-stream")
