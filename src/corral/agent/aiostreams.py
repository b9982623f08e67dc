"""Socket streams for the agent's coroutines (see `aio`), as asyncio's StreamReader and
StreamWriter: the host's connection and the connections to the sandbox's own ports.

A reader stops reading its socket while it holds PAUSE_READING unread bytes; a writer's
`drain()` waits while more than HIGH_WATER is unsent, as asyncio's do.
"""

from __future__ import annotations

# The C module, without `socket`'s wrapper: that brings `enum` and `selectors` (see `lean`).
import _socket as socket
import os

TYPE_CHECKING = False  # `typing` is for annotations only: 2 ms of every agent's start (aio)
if TYPE_CHECKING:
    from typing import Any, Optional, Tuple

try:
    from corral.agent.aio import (
        HIGH_WATER,
        LOW_WATER,
        PAUSE_READING,
        READ_SIZE,
        Future,
        IncompleteReadError,
        get_event_loop,
        release,
        writable,
    )
except ImportError:  # inside the sandbox the agent directory itself is on sys.path
    from aio import (  # type: ignore[import-not-found,no-redef]
        HIGH_WATER,
        LOW_WATER,
        PAUSE_READING,
        READ_SIZE,
        Future,
        IncompleteReadError,
        get_event_loop,
        release,
        writable,
    )


class Connection:
    """One connected, non-blocking socket: what a reader and its writer share."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.loop = get_event_loop()
        self.buffer = bytearray()  # read, not yet consumed
        self.at_eof = False
        self.reading = False
        self.unsent = bytearray()
        self.closing = False
        self.eof_to_send = False
        self.lost: Optional[BaseException] = None  # what ended it; ConnectionResetError if closed
        self.read_waiter: Optional[Future[Any]] = None
        self.drain_waiter: Optional[Future[Any]] = None
        self.resume_reading()

    def resume_reading(self) -> None:
        if not self.reading and not self.at_eof and self.lost is None and not self.closing:
            self.reading = True
            self.loop.add_reader(self.fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.lose(exc)
            return
        if data:
            self.buffer += data
            if len(self.buffer) > PAUSE_READING:
                self.reading = False
                self.loop.remove_reader(self.fd)
        else:
            self.at_eof = True
            self.reading = False
            self.loop.remove_reader(self.fd)
        self._wake_reader()

    def _wake_reader(self) -> None:
        if self.read_waiter is not None:
            release(self.read_waiter)

    def check(self) -> None:
        """Raise what broke the connection, if anything did (our own close is an end)."""
        if self.lost is not None and not isinstance(self.lost, ConnectionResetError):
            raise self.lost

    async def wait_readable(self) -> None:
        """Wait for more data. A reader waiting for more than the limit lets reading resume
        (as asyncio's): a frame larger than PAUSE_READING must still arrive whole."""
        self.check()
        self.resume_reading()
        waiter = self.read_waiter = self.loop.create_future()
        try:
            await waiter
        finally:
            if self.read_waiter is waiter:
                self.read_waiter = None

    def take(self, size: int) -> bytes:
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        if len(self.buffer) <= PAUSE_READING // 2:
            self.resume_reading()
        return data

    def write(self, data: bytes) -> None:
        if self.closing or self.lost is not None or self.eof_to_send or not data:
            return  # writing to a closed connection drops the data
        if not self.unsent:
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self.lose(exc)
                return
            if sent == len(data):
                return
            data = data[sent:]
            self.loop.add_writer(self.fd, self._on_writable)
        self.unsent += data

    def _on_writable(self) -> None:
        try:
            sent = self.sock.send(self.unsent)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.lose(exc)
            return
        del self.unsent[:sent]
        if len(self.unsent) <= LOW_WATER and self.drain_waiter is not None:
            release(self.drain_waiter)
        if not self.unsent:
            self.loop.remove_writer(self.fd)
            if self.closing:
                self.lose(None)
            elif self.eof_to_send:
                self._shut_down_writing()

    def _shut_down_writing(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.lose(exc)

    def write_eof(self) -> None:
        if self.closing or self.lost is not None or self.eof_to_send:
            return
        self.eof_to_send = True
        if not self.unsent:
            self._shut_down_writing()

    async def drain(self) -> None:
        while True:
            if self.lost is not None:
                raise self.lost
            if self.closing:
                raise ConnectionResetError("the connection is closing")
            if len(self.unsent) <= HIGH_WATER:
                return
            waiter = self.drain_waiter = self.loop.create_future()
            try:
                await waiter
            finally:
                if self.drain_waiter is waiter:
                    self.drain_waiter = None

    def close(self) -> None:
        """Close once what is unsent has gone."""
        if self.closing or self.lost is not None:
            return
        self.closing = True
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.fd)
        if not self.unsent:
            self.lose(None)

    def lose(self, exc: Optional[BaseException]) -> None:
        """End the connection: closed by us (None) or broken by `exc`."""
        if self.lost is not None:
            return
        self.lost = exc if exc is not None else ConnectionResetError("the connection is closed")
        self.loop.remove_reader(self.fd)
        self.loop.remove_writer(self.fd)
        self.reading = False
        self.sock.close()
        self._wake_reader()
        if self.drain_waiter is not None:
            release(self.drain_waiter)


class StreamReader:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    async def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes (all, to the end, if negative); b"" at the end."""
        conn = self.connection
        if size < 0:
            while not conn.at_eof and conn.lost is None:
                await conn.wait_readable()
            return conn.take(len(conn.buffer))
        while size and not conn.buffer and not conn.at_eof and conn.lost is None:
            await conn.wait_readable()
        conn.check()
        return conn.take(size)

    async def readexactly(self, size: int) -> bytes:
        conn = self.connection
        while len(conn.buffer) < size:
            if conn.at_eof or conn.lost is not None:
                conn.check()
                partial = conn.take(len(conn.buffer))
                raise IncompleteReadError(partial, size)
            await conn.wait_readable()
        return conn.take(size)


class StreamWriter:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def write(self, data: bytes) -> None:
        self.connection.write(data)

    async def drain(self) -> None:
        await self.connection.drain()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.connection.write_eof()

    def close(self, grace: Optional[float] = None) -> None:
        """Close once what is unsent has gone; or, `grace` seconds later, drop it and close
        anyway (a peer that never reads must not hold the connection)."""
        self.connection.close()
        if grace is not None and self.connection.lost is None:
            self.connection.loop.call_later(grace, self.connection.lose, None)


async def _connected(family: int, address: Any) -> Tuple[StreamReader, StreamWriter]:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.connect(address)
            pending = False
        except (BlockingIOError, InterruptedError):
            pending = True
        if pending:
            await writable(sock.fileno())
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise OSError(error, os.strerror(error))
        connection = Connection(sock)
    except BaseException:
        sock.close()
        raise
    return StreamReader(connection), StreamWriter(connection)


async def open_unix_connection(path: str) -> Tuple[StreamReader, StreamWriter]:
    return await _connected(socket.AF_UNIX, path)


async def open_connection(host: str, port: int) -> Tuple[StreamReader, StreamWriter]:
    return await _connected(socket.AF_INET, (host, port))
