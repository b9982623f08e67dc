"""The SDK's connection to the server: a connection that could not be made sent nothing, so it
is made again (a busy machine can take longer than the connect timeout, as a burst of 100
gVisor starts on two cores did in bench/run.py --only load); an answer that never came is not
asked again, since the server may have acted on it."""

from __future__ import annotations

import asyncio
import socket

import pytest

from corral.client._transport import Transport
from corral.core.errors import ConnectionFailed

ANSWER = (
    b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok": 1}\r\n'
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_a_connection_refused_at_first_is_made_again() -> None:
    port = free_port()
    asked: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        asked.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(ANSWER)
        await writer.drain()
        writer.close()

    async def listen_later() -> asyncio.Server:
        await asyncio.sleep(0.2)  # the first connect is refused: nothing listens yet
        return await asyncio.start_server(serve, "127.0.0.1", port)

    transport = Transport(f"http://127.0.0.1:{port}", "corral_key", 30, ca=None, verify=True)
    later = asyncio.create_task(listen_later())
    try:
        assert await asyncio.wait_for(transport.request("GET", "/healthz"), 30) == {"ok": 1}
    finally:
        (await later).close()
        await transport.aclose()
    assert len(asked) == 1 and asked[0].startswith(b"GET /healthz ")


async def test_nobody_listening_at_all_still_says_so() -> None:
    transport = Transport(f"http://127.0.0.1:{free_port()}", None, 30, ca=None, verify=True)
    try:
        with pytest.raises(ConnectionFailed) as failed:
            await asyncio.wait_for(transport.request("GET", "/healthz"), 30)
    finally:
        await transport.aclose()
    assert "is `corral serve` running" in str(failed.value)


async def test_a_request_sent_and_not_answered_is_not_sent_again() -> None:
    asked: list[bytes] = []

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        asked.append(await reader.readuntil(b"\r\n\r\n"))
        writer.close()  # no answer: the server may have acted on it

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = Transport(f"http://127.0.0.1:{port}", None, 30, ca=None, verify=True)
    try:
        with pytest.raises(ConnectionFailed):
            await asyncio.wait_for(transport.request("POST", "/v1/sandboxes", json={}), 30)
    finally:
        server.close()
        await transport.aclose()
    assert len(asked) == 1
