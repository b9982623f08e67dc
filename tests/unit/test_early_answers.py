"""An error answered before its request's body has arrived reaches the client (`EarlyAnswers`):
the server reads and drops the rest of the body first, within bounds, instead of closing on it
unread, which reset the connection under the client's writes."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from corral.server import errors

LIMIT = 1 << 20


async def create(request: Request) -> JSONResponse:
    return JSONResponse({"bytes": len(await request.body())})


async def missing(request: Request) -> JSONResponse:  # an upload's 404, before its body
    return JSONResponse({"error": {"code": "sandbox_not_found", "message": "no"}}, 404)


@pytest.fixture
async def url() -> AsyncIterator[str]:
    routes = [
        Route("/create", create, methods=["POST"]),
        Route("/upload", missing, methods=["PUT"]),
    ]
    limited = errors.BodyLimit(Starlette(routes=routes), LIMIT, lambda s: s["path"] == "/upload")
    server = uvicorn.Server(uvicorn.Config(errors.EarlyAnswers(limited), log_level="warning"))
    listening = socket.create_server(("127.0.0.1", 0))  # connections wait here until it serves
    serving = asyncio.create_task(server.serve(sockets=[listening]))
    yield f"http://127.0.0.1:{listening.getsockname()[1]}"
    server.should_exit = True
    await serving


async def test_a_large_body_refused_from_its_head_gets_the_error(url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        for _ in range(3):  # past the socket buffers: without the drain, a reset
            refused = await http.post("/create", content=b"x" * (16 << 20))
            assert refused.status_code == 413
            assert refused.json()["error"]["code"] == "payload_too_large"
            unknown = await http.put("/upload", content=b"x" * (16 << 20))
            assert unknown.status_code == 404
        assert (await http.post("/create", content=b"small")).json() == {"bytes": 5}


async def answer_to(url: str, head: bytes, body: bytes = b"") -> bytes:
    """The first line of the answer to `head` and `body`, sent and then nothing more."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head + body)
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_a_client_that_waits_to_send_hears_the_error_first(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(errors, "DRAIN_SECONDS", 60.0)  # a wrong wait fails the test
    head = b"POST /create HTTP/1.1\r\nHost: x\r\nContent-Length: 9000000000\r\n"
    waiting = await answer_to(url, head + b"Expect: 100-continue\r\n\r\n")
    assert waiting.startswith(b"HTTP/1.1 413 ")  # not 100 Continue: it need not send
    # And a body past what the server reads and drops is not waited for either.
    assert (await answer_to(url, head + b"\r\n")).startswith(b"HTTP/1.1 413 ")


async def test_a_body_that_stops_coming_is_waited_for_a_while(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(errors, "DRAIN_SECONDS", 0.3)
    head = b"PUT /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
    assert (await answer_to(url, head, b"x" * 10)).startswith(b"HTTP/1.1 404 ")
