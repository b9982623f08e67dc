"""envd's process service (`process.Process`, Connect JSON) over Corral's commands.

A command started here outlives the request that started it, as envd's do: its output is read
by the server for as long as it runs and goes to every stream attached to it (the `Start` that
started it, any `Connect`), with backpressure (a stream that does not read holds the command's
output up to its queue, then slows the command); with nobody attached it is read and dropped.
`Start`'s deadline (`Connect-Timeout-Ms`) is the command's timeout.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from corral.core.errors import CorralError, InvalidRequest, NotFound
from corral.core.models import ExecResult
from corral.core.spec import MAX_TIMEOUT
from corral.server.e2b import wire
from corral.server.e2b.gateway import handled, sandbox_caller
from corral.server.resources.sandboxes import Command, Process, Sandboxes

QUEUE = 64  # events waiting for one attached stream before the command is slowed
KEEPALIVE = 50.0  # seconds of silence before a keepalive event, unless the client asks
SIGNALS = {"SIGNAL_SIGKILL": "SIGKILL", "SIGNAL_SIGTERM": "SIGTERM", 9: "SIGKILL", 15: "SIGTERM"}

Event = dict[str, Any]
unary = handled(wire.connect_error)


@dataclasses.dataclass(eq=False)
class Running:
    """A command started through E2B, with the streams attached to it."""

    process: Process
    config: dict[str, Any]
    tag: str | None
    pty: bool
    watchers: set[asyncio.Queue[Event | None]] = dataclasses.field(default_factory=set)

    def watch(self) -> asyncio.Queue[Event | None]:
        queue: asyncio.Queue[Event | None] = asyncio.Queue(QUEUE)
        self.watchers.add(queue)
        return queue

    def unwatch(self, queue: asyncio.Queue[Event | None]) -> None:
        self.watchers.discard(queue)
        while not queue.empty():  # free a publisher blocked on this queue
            queue.get_nowait()

    async def publish(self, event: Event | None) -> None:
        for queue in list(self.watchers):
            if queue in self.watchers:
                await queue.put(event)


class ProcessTable:
    """The commands started through E2B that still run, by sandbox and pid."""

    def __init__(self) -> None:
        self._running: dict[str, dict[int, Running]] = {}
        self._pumps: set[asyncio.Task[None]] = set()

    def add(self, sandbox_id: str, running: Running) -> asyncio.Queue[Event | None]:
        """Track `running`; the queue of the stream that started it (attached before any
        output is read, so it misses none)."""
        self._running.setdefault(sandbox_id, {})[running.process.pid] = running
        queue = running.watch()
        pump = asyncio.create_task(self._pump(sandbox_id, running))
        self._pumps.add(pump)
        pump.add_done_callback(self._pumps.discard)
        return queue

    def of(self, sandbox_id: str) -> list[Running]:
        return list(self._running.get(sandbox_id, {}).values())

    def find(self, sandbox_id: str, selector: object) -> Running:
        """The running command a `ProcessSelector` (`{"pid"}` or `{"tag"}`) names."""
        if not isinstance(selector, dict) or not ({"pid", "tag"} & set(selector)):
            raise InvalidRequest("process must name a pid or a tag")
        for running in self.of(sandbox_id):
            if running.process.pid == selector.get("pid") or (
                "tag" in selector and running.tag == selector["tag"]
            ):
                return running
        raise NotFound(f"no running process {selector}", code="process_not_found")

    async def close(self) -> None:
        """Stop reading output (the commands keep running) and end the attached streams."""
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        for running in (r for table in self._running.values() for r in table.values()):
            for queue in list(running.watchers):
                running.unwatch(queue)
                queue.put_nowait(None)

    async def _pump(self, sandbox_id: str, running: Running) -> None:
        try:
            output = "pty" if running.pty else None
            async for name, data in running.process.output():
                await running.publish({"data": {output or name: wire.encode_bytes(data)}})
            end = end_event(await running.process.wait())
        except CorralError as error:
            end = {"end": {"exitCode": -1, "exited": False, "status": "error", "error": str(error)}}
        finally:
            table = self._running.get(sandbox_id, {})
            table.pop(running.process.pid, None)
            if not table:
                self._running.pop(sandbox_id, None)
        await running.publish(end)
        await running.publish(None)


def end_event(result: ExecResult) -> Event:
    """envd's end event for a command's result (a signal's death is exit code -1, as Go's)."""
    end: Event = {"exited": result.exit_code is not None}
    if result.exit_code is not None:
        end.update(exitCode=result.exit_code, status=f"exit status {result.exit_code}")
    else:
        end.update(exitCode=-1, status=f"signal: {result.signal}")
    if result.timed_out:
        end["error"] = "the command ran past its timeout and was killed"
    elif result.oom_killed:
        end["error"] = "the command ran out of memory and was killed"
    return {"end": end}


def table_of(request: Request) -> ProcessTable:
    table: ProcessTable = request.app.state.processes
    return table


def user_of(request: Request) -> str | None:
    """The user E2B's SDK asks for: `Authorization: Basic base64("<user>:")`."""
    header = request.headers.get("authorization", "")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user = base64.b64decode(encoded, validate=True).decode().partition(":")[0]
    except (binascii.Error, UnicodeDecodeError):
        raise InvalidRequest("the Authorization header is not Basic base64('<user>:')") from None
    return user or None


def _deadline(request: Request) -> float | None:
    value = request.headers.get("connect-timeout-ms")
    if value is None:
        return None
    if not value.isdigit():
        raise InvalidRequest("Connect-Timeout-Ms must be a whole number of milliseconds")
    return min(max(int(value), 1) / 1000, MAX_TIMEOUT) if int(value) else None


def _command(request: Request, body: dict[str, Any]) -> Command:
    config = body.get("process")
    if not isinstance(config, dict) or not isinstance(config.get("cmd"), str):
        raise InvalidRequest("process.cmd is required (the program to run)")
    args = config.get("args") or []
    envs = config.get("envs") or {}
    if not isinstance(args, list) or not isinstance(envs, dict):
        raise InvalidRequest("process.args must be a list and process.envs an object")
    tag = body.get("tag")
    return Command(
        argv=[config["cmd"], *args],
        env=envs or None,
        cwd=config.get("cwd") or None,
        user=user_of(request),
        timeout=_deadline(request),
        tag=tag if isinstance(tag, str) else None,
    )


def _size(pty: object) -> tuple[int, int]:
    size = pty.get("size") if isinstance(pty, dict) else None
    if not isinstance(size, dict):
        raise InvalidRequest("pty.size needs rows and cols")
    rows, cols = size.get("rows"), size.get("cols")
    if not isinstance(rows, int) or not isinstance(cols, int):
        raise InvalidRequest("pty.size needs rows and cols, whole numbers")
    return rows, cols


def _stream(
    request: Request,
    sandboxes: Sandboxes,
    sandbox_id: str,
    running: Running,
    queue: asyncio.Queue[Event | None],
) -> StreamingResponse:
    interval = request.headers.get("keepalive-ping-interval", "")
    every = float(interval) if interval.isdigit() and int(interval) > 0 else KEEPALIVE

    async def events() -> AsyncIterator[bytes]:
        try:
            async with sandboxes.active(sandbox_id):  # an attached client: the sandbox is in use
                yield wire.envelope({"event": {"start": {"pid": running.process.pid}}})
                while True:
                    try:
                        event = await asyncio.wait_for(queue.get(), every)
                    except TimeoutError:
                        yield wire.envelope({"event": {"keepalive": {}}})
                        continue
                    if event is None:
                        break
                    yield wire.envelope({"event": event})
            yield wire.end_of_stream()
        except CorralError as error:
            yield wire.end_of_stream(error)
        finally:
            running.unwatch(queue)

    return StreamingResponse(events(), media_type=wire.CONNECT_JSON)


def _stream_error(error: CorralError) -> Response:
    """A server stream's failure: 200, and the error in its end-of-stream envelope."""
    return Response(wire.end_of_stream(error), media_type=wire.CONNECT_JSON)


streamed = handled(_stream_error)


@streamed
async def start(request: Request) -> Response:
    """Start: run a command and stream its events (start, data..., end)."""
    sandboxes, sandbox_id = await sandbox_caller(request)
    body = await wire.message(request)
    command = _command(request, body)
    pty = _size(body["pty"]) if body.get("pty") is not None else None
    stdin = body.get("stdin") is not False or pty is not None
    process = await sandboxes.start(sandbox_id, command, stdin=stdin, pty=pty)
    config = {**body["process"], "args": list(command.argv or [])[1:]}
    running = Running(process, config, command.tag, pty is not None)
    queue = table_of(request).add(sandbox_id, running)
    return _stream(request, sandboxes, sandbox_id, running, queue)


@streamed
async def connect(request: Request) -> Response:
    """Connect: attach to a running command's events, from now on."""
    sandboxes, sandbox_id = await sandbox_caller(request)
    body = await wire.message(request)
    running = table_of(request).find(sandbox_id, body.get("process"))
    return _stream(request, sandboxes, sandbox_id, running, running.watch())


@unary
async def listing(request: Request) -> Response:
    _, sandbox_id = await sandbox_caller(request)
    processes = [
        {"config": r.config, "pid": r.process.pid, **({"tag": r.tag} if r.tag else {})}
        for r in table_of(request).of(sandbox_id)
    ]
    return JSONResponse({"processes": processes})


@unary
async def send_signal(request: Request) -> Response:
    """SendSignal: SIGKILL or SIGTERM to a command (not_found: it is not running)."""
    sandboxes, sandbox_id = await sandbox_caller(request)
    body = await wire.message(request)
    signal = SIGNALS.get(body.get("signal"))
    if signal is None:
        raise InvalidRequest("signal must be SIGNAL_SIGKILL or SIGNAL_SIGTERM")
    selector = body.get("process")
    try:
        await table_of(request).find(sandbox_id, selector).process.signal(signal)
    except NotFound:  # a process started through Corral's own API
        pid = selector.get("pid") if isinstance(selector, dict) else None
        found = [p for p in await sandboxes.processes(sandbox_id) if p.running and p.pid == pid]
        if not found:
            raise
        await sandboxes.signal(sandbox_id, found[-1].id, signal)
    return JSONResponse({})


@unary
async def send_input(request: Request) -> Response:
    _, sandbox_id = await sandbox_caller(request)
    body = await wire.message(request)
    running = table_of(request).find(sandbox_id, body.get("process"))
    await _write(running, body.get("input"))
    return JSONResponse({})


async def _write(running: Running, given: object) -> None:
    if not isinstance(given, dict) or not ({"stdin", "pty"} & set(given)):
        raise InvalidRequest("input must carry stdin or pty bytes (base64)")
    data = given.get("pty", given.get("stdin"))
    await running.process.write_stdin(wire.decode_bytes(data, "input"))


@unary
async def close_stdin(request: Request) -> Response:
    _, sandbox_id = await sandbox_caller(request)
    body = await wire.message(request)
    await table_of(request).find(sandbox_id, body.get("process")).process.close_stdin()
    return JSONResponse({})


@unary
async def update(request: Request) -> Response:
    """Update: resize a command's terminal."""
    _, sandbox_id = await sandbox_caller(request)
    body = await wire.message(request)
    running = table_of(request).find(sandbox_id, body.get("process"))
    rows, cols = _size(body.get("pty"))
    await running.process.resize(rows, cols)
    return JSONResponse({})


@streamed
async def stream_input(request: Request) -> Response:
    """StreamInput (a client stream): a start naming the command, then its input."""
    _, sandbox_id = await sandbox_caller(request)
    running: Running | None = None
    async for message in wire.messages(request):
        if "start" in message:
            running = table_of(request).find(sandbox_id, message["start"].get("process"))
        elif "data" in message:
            if running is None:
                raise InvalidRequest("send the start message first")
            await _write(running, message["data"].get("input"))
    return Response(wire.envelope({}) + wire.end_of_stream(), media_type=wire.CONNECT_JSON)


ROUTES = [
    Route(f"/process.Process/{name}", handler, methods=["POST"])
    for name, handler in (
        ("Start", start),
        ("Connect", connect),
        ("List", listing),
        ("SendSignal", send_signal),
        ("SendInput", send_input),
        ("CloseStdin", close_stdin),
        ("Update", update),
        ("StreamInput", stream_input),
    )
]
