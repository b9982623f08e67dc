"""The exec WebSocket: a process's output as it happens, its stdin, a terminal and signals.

    client                                           server
    text   {"cmd"|"argv", env, cwd, user, timeout, stdin: bool, pty: {rows, cols}}
                                                     text   {"type": "started", "id", "pid"}
    binary 0x00 + bytes            (stdin)           binary 0x01 + bytes   (stdout)
    text   {"type": "stdin_close"}                   binary 0x02 + bytes   (stderr)
    text   {"type": "resize", "rows", "cols"}
    text   {"type": "signal", "signal": "SIGINT"}
                                                     text   {"type": "exit", "exit_code",
                                                             "signal", "timed_out", "oom_killed"}
A missing or unknown key and a sandbox that is not the caller's are refused before the socket
is accepted, with the HTTP status and JSON error a request would get. Later errors arrive as
`{"type": "error", "status", "error": {"code", "message"}}` and the socket closes with 4000 +
the HTTP status (4404, 4409, ...). A client that disconnects kills its
process: a stream nobody reads would otherwise leave it running unseen. A server that shuts
down does not: the process keeps running and the restarted server lists it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from corral.core.errors import CorralError, InvalidRequest
from corral.server.auth import websocket_protocol, websocket_tenant
from corral.server.errors import describe_validation, error_response
from corral.server.resources.sandboxes import Process, Sandboxes
from corral.server.routes.processes import command_of
from corral.server.schemas import StreamExec

log = logging.getLogger("corral.server")
router = APIRouter(prefix="/v1")

STDIN, STDOUT, STDERR = 0, 1, 2
FIRST_MESSAGE_TIMEOUT = 30.0
SERVER_GOING_AWAY = 1012  # the close code uvicorn reports when the server shuts down
CLOSE_CODE_WAIT = 2.0  # seconds the feeder gets to hear why the connection ended


@router.websocket("/sandboxes/{sandbox_id}/exec/stream")
async def exec_stream(websocket: WebSocket, sandbox_id: str) -> None:
    sandboxes = await admit(websocket, sandbox_id)
    if sandboxes is None:
        return
    try:
        request = await _first_message(websocket)
        pty = (request.pty.rows, request.pty.cols) if request.pty else None
        command = command_of(request)
        process = await sandboxes.start(sandbox_id, command, stdin=request.stdin, pty=pty)
    except CorralError as error:
        await close_with(websocket, error)
        return
    except WebSocketDisconnect:
        return
    async with sandboxes.active(sandbox_id):  # an attached client: the sandbox is in use
        await _relay(websocket, process)


async def _first_message(websocket: WebSocket) -> StreamExec:
    try:
        text = await asyncio.wait_for(websocket.receive_text(), FIRST_MESSAGE_TIMEOUT)
    except TimeoutError:
        raise InvalidRequest("send the command as the first message within 30 s") from None
    except KeyError:  # a binary first message
        raise InvalidRequest("the first message must be the command, as JSON text") from None
    try:
        return StreamExec.model_validate_json(text)
    except ValidationError as exc:
        raise InvalidRequest(describe_validation(exc.errors())) from None


async def _relay(websocket: WebSocket, process: Process) -> None:
    """Relay until the process ends or the connection does. A client that leaves, even while
    the process is silent, gets its process killed; a server that stops keeps it running (a
    restarted server re-adopts the sandbox, and the process must still be running there)."""
    feeder = asyncio.create_task(_feed(websocket, process))
    sender = asyncio.create_task(_send(websocket, process))
    try:
        await asyncio.wait((feeder, sender), return_when=asyncio.FIRST_COMPLETED)
        if sender.done():
            try:
                sender.result()
                return  # the process ended and the client heard so
            except CorralError as error:  # the sandbox or its agent went away: say so
                with contextlib.suppress(Exception):
                    await close_with(websocket, error)
                return
            except (WebSocketDisconnect, RuntimeError, OSError):
                pass  # the connection is gone; the feeder hears whether the client left
        if await _close_code(feeder) != SERVER_GOING_AWAY:
            sender.cancel()
            with contextlib.suppress(CorralError):
                await process.kill()
    finally:
        feeder.cancel()
        sender.cancel()


async def _send(websocket: WebSocket, process: Process) -> None:
    """The process's start, output and end to the client, then a normal close."""
    await websocket.send_json({"type": "started", "id": process.id, "pid": process.pid})
    async for name, data in process.output():
        await websocket.send_bytes(bytes((STDOUT if name == "stdout" else STDERR,)) + data)
    result = await process.wait()
    await websocket.send_json(
        {
            "type": "exit",
            "exit_code": result.exit_code,
            "signal": result.signal,
            "timed_out": result.timed_out,
            "oom_killed": result.oom_killed,
        }
    )
    await websocket.close(1000)


async def _close_code(feeder: asyncio.Task[int]) -> int | None:
    """The connection's close code, as the feeder hears it. A send can fail before the
    feeder has heard the close (the server shutting down fails both at once), so it gets a
    moment to hear it; without that, a shutdown could pass for a client that left."""
    with contextlib.suppress(Exception):  # the wait timing out, or the feeder failing
        return await asyncio.wait_for(asyncio.shield(feeder), CLOSE_CODE_WAIT)
    return None


async def _feed(websocket: WebSocket, process: Process) -> int:
    """Client messages to the process, until the connection ends; its close code."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return int(message.get("code") or 1005)
        try:
            if message.get("bytes") is not None:
                data: bytes = message["bytes"]
                if data[:1] == bytes((STDIN,)):
                    await process.write_stdin(data[1:])
                continue
            control = json.loads(message.get("text") or "{}")
            kind = control.get("type")
            if kind == "stdin_close":
                await process.close_stdin()
            elif kind == "resize":
                await process.resize(int(control["rows"]), int(control["cols"]))
            elif kind == "signal":
                await process.signal(control.get("signal", "SIGTERM"))
        except (CorralError, ValueError, KeyError, TypeError) as error:
            log.debug("exec stream control message failed: %s", error)


async def admit(websocket: WebSocket, sandbox_id: str) -> Sandboxes | None:
    """The caller's sandboxes, with the socket accepted; None once refused. The key, and whose
    sandbox this is, are checked before the socket is accepted: an unknown caller never gets
    one (an HTTP answer, the same JSON error as a request's)."""
    try:
        sandboxes = Sandboxes(await websocket_tenant(websocket))
        await sandboxes.info(sandbox_id)
    except CorralError as error:
        await deny(websocket, error)
        return None
    await websocket.accept(subprotocol=websocket_protocol(websocket))
    return sandboxes


async def deny(websocket: WebSocket, error: CorralError) -> None:
    """Refuse the WebSocket with an HTTP answer, where the server can send one."""
    try:
        await websocket.send_denial_response(error_response(error))
    except RuntimeError:  # a server without the denial extension: a bare refusal
        await websocket.close(4000 + error.status_code, error.code[:120])


async def close_with(websocket: WebSocket, error: CorralError) -> None:
    await websocket.send_json({"type": "error", "status": error.status_code, **error.to_dict()})
    await websocket.close(4000 + error.status_code, error.code[:120])
