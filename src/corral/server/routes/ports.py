"""The port WebSocket: a raw TCP connection to a port inside a sandbox, as binary messages
both ways (`corral port-forward` uses it). The text message `eof` half-closes the connection
in the sandbox (the client sends no more; answers still come); closing the socket closes it;
the sandbox's side closing it closes the socket (1000). Refusals are as for
the exec WebSocket: an HTTP answer before the socket is accepted (a wrong key, another key's
sandbox), else `{"type": "error", ...}` and close code 4000 + status (4502: nothing listens)."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from corral.core.errors import CorralError
from corral.server.resources.sandboxes import PortStream
from corral.server.routes.stream import admit, close_with

router = APIRouter(prefix="/v1")


@router.websocket("/sandboxes/{sandbox_id}/ports/{port}/connect")
async def port_connect(websocket: WebSocket, sandbox_id: str, port: int) -> None:
    sandboxes = await admit(websocket, sandbox_id)
    if sandboxes is None:
        return
    try:
        stream = await sandboxes.connect_port(sandbox_id, port)
    except CorralError as error:
        await close_with(websocket, error)
        return
    try:
        async with sandboxes.active(sandbox_id):  # a connection in use: the sandbox is in use
            sending = asyncio.create_task(_to_sandbox(websocket, stream))
            try:
                while (data := await stream.receive()) is not None:
                    await websocket.send_bytes(data)
                await websocket.close(1000)
            finally:
                sending.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await sending
    except (CorralError, WebSocketDisconnect, RuntimeError, OSError):
        pass
    finally:
        await stream.close()


async def _to_sandbox(websocket: WebSocket, stream: PortStream) -> None:
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            await stream.close()
            return
        if message.get("bytes"):
            await stream.send(message["bytes"])
        elif message.get("text") == "eof":
            await stream.send_eof()
