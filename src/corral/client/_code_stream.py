"""The code WebSocket of one sandbox (`/code/stream`), shared by its `run_code` calls: one
connection, many executions, each told apart by an id (see `corral.server.routes.code_stream`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from corral.core.errors import ConnectionFailed, CorralError, from_response

if TYPE_CHECKING:
    from corral.client._transport import Socket


class CodeStream:
    """An open code WebSocket; `closed` once it has ended (a new one is opened then)."""

    def __init__(self, socket: Socket) -> None:
        self._socket = socket
        self._queues: dict[int, asyncio.Queue[dict[str, Any] | None]] = {}
        self._next = 0
        self.closed = False
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def run(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The events of one execution of `body`; leaving early interrupts it."""
        self._next += 1
        ident = self._next
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._queues[ident] = queue
        ended = False
        try:
            await self._socket.send(json.dumps({**body, "id": ident}))
            while not ended:
                event = await queue.get()
                if event is None:
                    raise ConnectionFailed("the code stream closed during the execution")
                if event["type"] == "failed":
                    ended = True
                    raise _failure(event)
                ended = event["type"] == "end"
                yield event
        finally:
            self._queues.pop(ident, None)
            if not ended and not self.closed:
                with contextlib.suppress(CorralError):
                    await self._socket.send(json.dumps({"type": "cancel", "id": ident}))

    async def _read(self) -> None:
        try:
            async for message in self._socket.messages():
                event = json.loads(message)
                queue = self._queues.get(event.pop("id", None))
                if queue is not None:
                    queue.put_nowait(event)
        finally:
            self.closed = True
            for queue in self._queues.values():
                queue.put_nowait(None)


def _failure(event: dict[str, Any]) -> CorralError:
    error = event.get("error") or {}
    return from_response(
        int(event.get("status") or 500), str(error.get("code")), str(error.get("message"))
    )
