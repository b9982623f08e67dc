"""A response in one write: the server's HTTP connections send a response's head together with
the first part of its body.

uvicorn writes a response's head to its socket as soon as the app starts the response, and the
body after it: two system calls, and on the client's side two wake-ups, where the head alone is
of no use to it. Over loopback on a small VM that cost up to 0.7 ms of a 2 to 2.7 ms exec round
trip (docs/performance.md, "Thirteenth round"). Here a small write waits for the next one,
which then goes out with it at once, or for the end of the event loop's turn if no other comes
by then (a close sends it first): a response of a head and a body leaves in one write, when its
body is written, and nothing waits longer than the turn it was written in.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HOLD_BELOW = 64 * 1024  # bytes: a larger write goes out at once


class Gathered(asyncio.Transport):
    """`transport`, where a small write waits for the next (at most to the end of the turn)."""

    def __init__(self, transport: asyncio.Transport) -> None:
        super().__init__()
        self._real = transport
        self._loop = asyncio.get_running_loop()
        self._held: bytes | None = None
        self._soon = False  # a flush is scheduled at the end of this turn

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if len(data) >= HOLD_BELOW:  # large: not worth copying to join
            self.flush()
            self._send(data)
        elif self._held is not None:  # the head, say, and now its body: both, at once
            joined, self._held = self._held + bytes(data), None
            self._send(joined)
        else:
            self._held = bytes(data)
            if not self._soon:
                self._soon = True
                self._loop.call_soon(self._flush_soon)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def _flush_soon(self) -> None:
        self._soon = False
        self.flush()

    def flush(self) -> None:
        """Send what is held now."""
        if self._held is not None:
            data, self._held = self._held, None
            self._send(data)

    def _send(self, data: bytes | bytearray | memoryview) -> None:
        if not self._real.is_closing():  # closing: nobody reads it any more
            self._real.write(data)

    def write_eof(self) -> None:
        self.flush()
        self._real.write_eof()

    def can_write_eof(self) -> bool:
        return self._real.can_write_eof()

    def close(self) -> None:
        self.flush()
        self._real.close()

    def abort(self) -> None:
        self._held = None
        self._real.abort()

    def is_closing(self) -> bool:
        return self._real.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._real.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._real.set_protocol(protocol)  # a WebSocket's, after its upgrade

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._real.get_protocol()

    def pause_reading(self) -> None:
        self._real.pause_reading()

    def resume_reading(self) -> None:
        self._real.resume_reading()

    def is_reading(self) -> bool:
        return self._real.is_reading()

    def get_write_buffer_size(self) -> int:
        return self._real.get_write_buffer_size() + len(self._held or b"")

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._real.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._real.set_write_buffer_limits(high, low)


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol (httptools), on a `Gathered` transport; a WebSocket upgraded
    from it keeps that transport."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(Gathered(transport))
