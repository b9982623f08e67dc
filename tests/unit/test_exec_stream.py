"""The exec WebSocket's relay: who ended the connection decides whether the process lives.

The server's shutdown fails a send and closes the socket at once, so the relay can see the
failed send before it hears the close code; it must still keep the process running. A client
that leaves kills its process, even one that prints nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, cast

from corral.server.routes import stream as relay

SHUTDOWN, CLIENT_LEFT = 1012, 1000


class Socket:
    """A WebSocket whose sends fail once it is cut, and which reports its close code after
    `hear_after` seconds (the order a server's shutdown can produce)."""

    def __init__(self, code: int, hear_after: float, cut: bool) -> None:
        self.code, self.hear_after, self.cut = code, hear_after, cut
        self.sent: list[Any] = []

    async def send_json(self, message: Any) -> None:
        self.sent.append(message)

    async def send_bytes(self, data: bytes) -> None:
        if self.cut:
            raise OSError("the connection is gone")
        self.sent.append(data)

    async def close(self, code: int) -> None:
        self.sent.append(code)

    async def receive(self) -> dict[str, Any]:
        await asyncio.sleep(self.hear_after)
        return {"type": "websocket.disconnect", "code": self.code}


class Command:
    """A process that prints `lines` lines and then runs silently until killed."""

    id, pid = 7, 70

    def __init__(self, lines: int) -> None:
        self.lines = lines
        self.killed = asyncio.Event()

    async def output(self) -> AsyncIterator[tuple[str, bytes]]:
        for _ in range(self.lines):
            yield "stdout", b"tick\n"
        await self.killed.wait()

    async def kill(self) -> None:
        self.killed.set()


async def _relay(socket: Socket, command: Command) -> None:
    async with asyncio.timeout(30):  # hang bound only
        await relay._relay(cast(Any, socket), cast(Any, command))


async def test_a_shutdown_heard_after_a_failed_send_keeps_the_process() -> None:
    command = Command(lines=1)
    await _relay(Socket(SHUTDOWN, hear_after=0.2, cut=True), command)
    assert not command.killed.is_set()


async def test_a_client_that_leaves_while_output_flows_kills_its_process() -> None:
    command = Command(lines=1)
    await _relay(Socket(CLIENT_LEFT, hear_after=0.2, cut=True), command)
    assert command.killed.is_set()


async def test_a_client_that_leaves_a_silent_process_kills_it() -> None:
    command = Command(lines=0)
    await _relay(Socket(CLIENT_LEFT, hear_after=0.1, cut=False), command)
    assert command.killed.is_set()


async def test_a_shutdown_during_silence_keeps_the_process() -> None:
    command = Command(lines=0)
    await _relay(Socket(SHUTDOWN, hear_after=0.1, cut=False), command)
    assert not command.killed.is_set()
