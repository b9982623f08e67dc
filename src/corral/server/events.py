"""State changes of sandboxes, and their refused connections, as events for each API key's
event streams (`GET /v1/events`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from corral.core.models import SandboxInfo

EVENT_BACKLOG = 1000  # events kept for one slow reader
EVENT_KEEPALIVE = 15.0  # seconds between comments on a quiet event stream


async def server_sent(
    queue: asyncio.Queue[dict[str, Any]], sandbox_id: str | None
) -> AsyncIterator[bytes]:
    """The events of `queue` (of one sandbox only, with `sandbox_id`) as server-sent events,
    numbered from 1, with a comment every `EVENT_KEEPALIVE` seconds of quiet."""
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


class EventHub:
    """Fans each sandbox's state changes out to the streams of the key that owns it."""

    def __init__(self) -> None:
        self._subscribers: dict[str, set[asyncio.Queue[dict[str, Any]]]] = {}
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []  # webhooks

    def publish(self, owner: str, info: SandboxInfo) -> None:
        """Tell `owner`'s event streams about the sandbox's latest state change."""
        last = info.history[-1] if info.history else None
        self.send(
            owner,
            {
                "type": "sandbox.state",
                "sandbox_id": info.id,
                "state": info.state.value,
                "reason": last.reason if last else None,
                "at": last.at if last else time.time(),
                "end_reason": info.end_reason.value if info.end_reason else None,
                "end_detail": info.end_detail,
            },
        )

    def send(self, owner: str, event: dict[str, Any]) -> None:
        """Tell `owner`'s event streams (and listeners) about `event` (a `type` and the
        `sandbox_id`)."""
        for listener in self.listeners:
            listener(owner, event)
        for queue in self._subscribers.get(owner, ()):
            if queue.full():  # a reader that does not keep up loses its stream, not memory
                queue.get_nowait()
                queue.put_nowait({"type": "events.lost", "at": time.time()})
            else:
                queue.put_nowait(event)

    @contextlib.contextmanager
    def subscribe(self, owner: str) -> Iterator[asyncio.Queue[dict[str, Any]]]:
        """A queue of the state changes of `owner`'s sandboxes, for as long as the block runs."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(EVENT_BACKLOG)
        self._subscribers.setdefault(owner, set()).add(queue)
        try:
            yield queue
        finally:
            self._subscribers[owner].discard(queue)
            if not self._subscribers[owner]:
                del self._subscribers[owner]
