"""The server's HTTP connections send a response's head with its body, in one write
(`corral.server.writes`): the transport's rule alone, then uvicorn on it."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest
import uvicorn
import websockets
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from corral.server.writes import HOLD_BELOW, Gathered, HttpProtocol


class _Socket(asyncio.Transport):
    """What `Gathered` passes on: each write, and whether it was closed or aborted."""

    def __init__(self) -> None:
        super().__init__({"peername": ("127.0.0.1", 1)})
        self.writes: list[bytes] = []
        self.ended: str | None = None
        self.protocol: asyncio.BaseProtocol | None = None

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.ended = "closed"

    def abort(self) -> None:
        self.ended = "aborted"

    def is_closing(self) -> bool:
        return self.ended is not None

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_write_buffer_size(self) -> int:
        return 0


async def test_a_head_goes_with_its_body_and_nothing_waits_past_its_turn() -> None:
    real = _Socket()
    gathered = Gathered(real)
    gathered.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert real.writes == []  # the head alone is of no use to the client
    gathered.write(b'{"ok": true}')
    assert real.writes == [b'HTTP/1.1 200 OK\r\n\r\n{"ok": true}']  # at once, together
    gathered.write(b"a streamed part")
    assert real.writes[1:] == []
    await asyncio.sleep(0)  # the end of the turn it was written in
    assert real.writes[1:] == [b"a streamed part"]
    await asyncio.sleep(0)
    assert len(real.writes) == 2


async def test_large_writes_go_at_once_after_what_was_held() -> None:
    real = _Socket()
    gathered = Gathered(real)
    big = b"x" * HOLD_BELOW
    gathered.write(b"head")
    gathered.write(memoryview(big))
    assert real.writes == [b"head", big]
    assert gathered.get_write_buffer_size() == 0


async def test_a_close_sends_what_is_held_first_and_an_abort_drops_it() -> None:
    real = _Socket()
    gathered = Gathered(real)
    gathered.write(b"last words")
    gathered.close()
    assert real.writes == [b"last words"] and real.ended == "closed"
    gathered.write(b"after the close")
    await asyncio.sleep(0)
    assert real.writes == [b"last words"]  # nothing is written to a closing connection
    other = _Socket()
    dropped = Gathered(other)
    dropped.write(b"never")
    assert dropped.get_write_buffer_size() == len(b"never")
    dropped.abort()
    await asyncio.sleep(0)
    assert other.writes == [] and other.ended == "aborted"


async def test_the_rest_is_the_connections_own() -> None:
    real = _Socket()
    gathered = Gathered(real)
    assert gathered.get_extra_info("peername") == ("127.0.0.1", 1)
    assert gathered.get_extra_info("sslcontext", "none") == "none"
    protocol = asyncio.Protocol()
    gathered.set_protocol(protocol)  # as a WebSocket's upgrade does
    assert real.protocol is protocol


async def _json(request: Request) -> Response:
    return JSONResponse({"path": request.url.path})


async def _streamed(request: Request) -> Response:
    async def parts() -> Any:
        for index in range(3):
            yield f"part {index}\n".encode()
            await asyncio.sleep(0.01)

    return StreamingResponse(parts(), media_type="text/plain")


async def _echo(socket: WebSocket) -> None:
    await socket.accept()
    await socket.send_text(await socket.receive_text())
    await socket.close()


@pytest.fixture
async def served() -> Any:
    """uvicorn on `HttpProtocol`, in this loop, on a free port: its writes to its sockets."""
    app = Starlette(
        routes=[
            Route("/json", _json),
            Route("/streamed", _streamed),
            WebSocketRoute("/echo", _echo),
        ]
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, http=HttpProtocol, lifespan="off", log_level="warning"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn's flag; it has no event to wait on
        await asyncio.sleep(0.01)
    yield port
    server.should_exit = True
    await asyncio.wait_for(task, 10)


async def test_uvicorn_sends_a_response_in_one_write_and_streams_and_upgrades_as_before(
    served: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[bytes] = []
    real_send = Gathered._send

    def recorded(self: Gathered, data: Any) -> None:
        sent.append(bytes(data))
        real_send(self, data)

    monkeypatch.setattr(Gathered, "_send", recorded)
    reader, writer = await asyncio.open_connection("127.0.0.1", served)
    for _ in range(2):  # and again on the kept-alive connection
        sent.clear()
        writer.write(b"GET /json HTTP/1.1\r\nHost: test\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = int(next(line for line in head.split(b"\r\n") if b"content-length" in line)[16:])
        body = await reader.readexactly(length)
        assert json.loads(body) == {"path": "/json"}
        assert sent == [head + body]  # one write: the head and the body together
    writer.write(b"GET /streamed HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)
    assert answer.startswith(b"HTTP/1.1 200") and all(
        f"part {i}".encode() in answer for i in range(3)
    )
    writer.close()
    async with websockets.connect(f"ws://127.0.0.1:{served}/echo") as echo:
        await echo.send("over the same transport")
        assert await asyncio.wait_for(echo.recv(), 10) == "over the same transport"
