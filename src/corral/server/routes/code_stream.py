"""The code WebSocket: many executions over one connection, each as its events.

    client                                              server
    text {"id": 1, "code", "language", "context",       text {"id": 1, "type": "started", ...}
          "env", "timeout"}                             text {"id": 1, "type": "stdout", ...}
    text {"type": "cancel", "id": 1}                    text {"id": 1, "type": "end", ...}
                                                        text {"id": 2, "type": "failed",
                                                              "status", "error": {code, message}}

Requests may overlap (their events are told apart by `id`); each runs like
`POST /code` (the same events, the same checks), and one that cannot run gets `failed` with the
HTTP status and error it would have had. A client that disconnects, or cancels, interrupts its
code. The key and the sandbox are checked before the socket is accepted, as for exec. Once the
sandbox ends, what was running says `failed`, then the socket closes as exec's does:
`{"type": "error", "status": 410, "error": {"code": "sandbox_ended", ...}}` and close code 4410.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from corral.core.errors import CorralError, InvalidRequest, SandboxEnded
from corral.core.state import SandboxState
from corral.server.errors import describe_validation
from corral.server.resources.sandboxes import Sandboxes
from corral.server.routes.code import RunCode, open_execution
from corral.server.routes.stream import admit, close_with

router = APIRouter(prefix="/v1")
MAX_RUNNING = 64  # executions one socket may have at once
END_WAIT = 5.0  # seconds the executions of an ended sandbox get to say so before the close


class CodeRequest(RunCode):
    id: int


@router.websocket("/sandboxes/{sandbox_id}/code/stream")
async def code_stream(websocket: WebSocket, sandbox_id: str) -> None:
    sandboxes = await admit(websocket, sandbox_id)
    if sandboxes is None:
        return
    lock = asyncio.Lock()
    running: dict[int, asyncio.Task[None]] = {}

    async def send(message: dict[str, Any]) -> None:
        async with lock:
            await websocket.send_text(json.dumps(message, separators=(",", ":")))

    serving = asyncio.create_task(_serve(websocket, sandboxes, sandbox_id, send, running))
    ended = asyncio.create_task(_until_ended(sandboxes, sandbox_id))
    try:
        await asyncio.wait((serving, ended), return_when=asyncio.FIRST_COMPLETED)
        if not serving.done():  # the sandbox ended: what ran has said so, and the socket closes
            if running:
                await asyncio.wait(list(running.values()), timeout=END_WAIT)
            with contextlib.suppress(Exception):  # the client may be gone meanwhile
                async with lock:
                    await close_with(websocket, ended.result())
    finally:
        serving.cancel()
        ended.cancel()
        for task in running.values():
            task.cancel()  # interrupts the code: nobody reads its events any more


async def _serve(
    websocket: WebSocket,
    sandboxes: Sandboxes,
    sandbox_id: str,
    send: Any,
    running: dict[int, asyncio.Task[None]],
) -> None:
    """Run what the client asks, until it leaves."""
    try:
        while True:
            text = await websocket.receive_text()
            request = await _request(text, send, running)
            if request is not None:
                task = asyncio.create_task(_execute(sandboxes, sandbox_id, request, send))
                running[request.id] = task
                task.add_done_callback(functools.partial(_forget, running, request.id))
    except (WebSocketDisconnect, RuntimeError, KeyError):
        pass  # the client left (KeyError: a binary message, which this socket does not take)


async def _until_ended(sandboxes: Sandboxes, sandbox_id: str) -> CorralError:
    """Once the sandbox has ended (or is gone): the error its socket closes with."""
    with await sandboxes.events(None) as changes:  # the key's (`admit` checked the sandbox)
        while True:
            try:
                info = await sandboxes.info(sandbox_id)
            except CorralError as gone:
                return gone
            if info.state is SandboxState.TERMINATED:
                why = info.end_reason.value if info.end_reason else "terminated"
                return SandboxEnded(f"sandbox {sandbox_id} ended ({why}); create another")
            change = await changes.get()
            while change.get("sandbox_id") not in (sandbox_id, None):  # None: events were lost
                change = await changes.get()


async def _request(
    text: str, send: Any, running: dict[int, asyncio.Task[None]]
) -> CodeRequest | None:
    """The execution `text` asks for; None for a cancel or a refused request."""
    try:
        message = json.loads(text)
    except ValueError as exc:
        message = exc
    ident = message.get("id") if isinstance(message, dict) else None
    if isinstance(message, dict) and message.get("type") == "cancel":
        task = running.get(ident) if isinstance(ident, int) else None
        if task is not None:
            task.cancel()
        return None
    try:
        if not isinstance(message, dict):
            raise InvalidRequest(f"a message must be a JSON object: {message}")
        try:
            request = CodeRequest.model_validate(message)
        except ValidationError as exc:
            raise InvalidRequest(describe_validation(exc.errors())) from None
        if len(running) >= MAX_RUNNING or request.id in running:
            raise InvalidRequest(
                f"id {request.id} is running, or {MAX_RUNNING} executions are: wait for an end"
            )
    except InvalidRequest as error:
        await send({"id": ident, "type": "failed", "status": 400, **error.to_dict()})
        return None
    return request


def _forget(running: dict[int, asyncio.Task[None]], ident: int, _task: object) -> None:
    running.pop(ident, None)


async def _execute(sandboxes: Sandboxes, sandbox_id: str, request: CodeRequest, send: Any) -> None:
    ident = request.id
    try:
        slot, first, events = await open_execution(sandboxes, sandbox_id, request)
    except CorralError as error:
        await send({"id": ident, "type": "failed", "status": error.status_code, **error.to_dict()})
        return
    with slot:
        try:
            async with sandboxes.active(sandbox_id):  # running code is use
                await send({**first, "id": ident})
                async for event in events:
                    await send({**event, "id": ident})
        except CorralError as error:  # the sandbox ended under the code
            with contextlib.suppress(Exception):
                await send(
                    {"id": ident, "type": "failed", "status": error.status_code, **error.to_dict()}
                )
        finally:
            await events.aclose()
