"""The host's end of the agent protocol: one listening socket per sandbox, many streams on it.

The host listens; the guest agent dials in (and re-dials after any drop), is challenged, and
proves with its HELLO that it holds the sandbox's secret. Nothing else is ever read from a
connection that has not proved it, and only a connection that has may replace the agent's
current one. A `Channel` is one CALL and everything that flows on its stream until the REPLY.
See `corral.agent.protocol` for the frame format, the secret and flow control.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from corral.agent import protocol as P
from corral.core.errors import AgentUnavailable, CorralError, from_guest

HELLO_TIMEOUT = 5.0
MAX_UNREAD_MESSAGES = 64  # EVENTs a stream may have waiting (one or two in practice)
# Connections waiting for their HELLO at once; past it the oldest is dropped, so connections
# that never answer cannot keep the agent out (only who knows the socket's name can connect).
MAX_HANDSHAKES = 8


def bind_unix(path: Path) -> socket.socket:
    """A listening socket bound at `path`, however deep: a socket's address holds at most 107
    bytes, so it is bound through the directory's descriptor, whose name is always short."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        sock.bind(f"/proc/self/fd/{fd}/{path.name}")
    except BaseException:
        sock.close()
        raise
    finally:
        os.close(fd)
    return sock


class Channel:
    """One stream: a CALL, the frames it produces, and finally its REPLY."""

    def __init__(self, link: _Connection, stream_id: int) -> None:
        self._conn = link
        self.id = stream_id
        self._inbox: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self._window = P.WINDOW_INITIAL
        self._window_open = asyncio.Event()
        self._window_open.set()
        self._done = False
        self._replied = False  # a REPLY has arrived, read or not
        self._reply: dict[str, Any] | None = None
        self._unread_bytes = 0
        self._unread_messages = 0
        self.awaited = False  # its caller waits for its end, which a quiesce lets come first

    # Called by the connection's reader.
    def _deliver(self, kind: int, payload: Any) -> None:
        # The guest runs inside the sandbox, beside untrusted code that can reach its socket:
        # a peer that ignores flow control must not make the host buffer without bound.
        if kind in P.DATA_KINDS:
            self._unread_bytes += len(payload)
            if self._unread_bytes > P.WINDOW_INITIAL + P.CHUNK:  # a sender may overshoot a chunk
                raise P.ProtocolError(f"stream {self.id} sent past its window")
        else:
            self._unread_messages += 1
            if self._unread_messages > MAX_UNREAD_MESSAGES:
                raise P.ProtocolError(f"stream {self.id} sent too many messages")
            if kind == P.REPLY:
                # The guest has finished the stream, maybe early (a write that hit ENOSPC): it
                # grants no more credit, so a sender waiting for some must stop now.
                self._replied = True
                self._window_open.set()
                self._conn.answered.set()
        self._inbox.put_nowait((kind, payload))

    def _grant(self, amount: int) -> None:
        self._window += amount
        if self._window > 0:
            self._window_open.set()

    def _fail(self, error: CorralError) -> None:
        self._unread_messages += 1
        self._inbox.put_nowait((P.REPLY, {"error": {"code": error.code, "message": error.message}}))
        self._window_open.set()

    async def send_data(self, kind: int, data: bytes) -> None:
        """Send `data` on this stream, waiting for credit when the guest is behind."""
        view = memoryview(data)
        while view and not self.finished:
            while self._window <= 0 and not self.finished:
                self._window_open.clear()
                await self._window_open.wait()
            if self.finished:
                break
            chunk = bytes(view[: P.CHUNK])
            view = view[P.CHUNK :]
            self._window -= len(chunk)
            await self._conn.send(P.encode(self.id, kind, chunk))

    async def send_eof(self, kind: int) -> None:
        if not self._done:
            await self._conn.send(P.encode(self.id, P.EOF, bytes([kind])))

    async def cancel(self) -> None:
        """Ask the guest to stop this stream; it still answers with a REPLY."""
        if not self._done:
            with contextlib.suppress(CorralError, OSError):
                await self._conn.send(P.encode(self.id, P.CANCEL))

    async def receive(self) -> tuple[int, Any]:
        """The next (kind, payload): EVENT and REPLY payloads are dicts, data kinds are bytes.

        Data is acknowledged to the guest as it is taken from here, so an unread stream holds
        at most one window of data in memory.
        """
        kind, payload = await self._inbox.get()
        if kind in P.DATA_KINDS:
            self._unread_bytes -= len(payload)
        else:
            self._unread_messages -= 1
        if kind in P.DATA_KINDS and payload:
            with contextlib.suppress(CorralError, OSError):
                await self._conn.send(
                    P.encode(self.id, P.WINDOW_UPDATE, P.WINDOW.pack(len(payload)))
                )
        elif kind == P.REPLY:
            self._done = True
            self._reply = payload
            self._window_open.set()
            self._conn.forget(self.id)
        return kind, payload

    async def result(self) -> Any:
        """Wait for the REPLY (dropping anything before it); its result, or its error raised."""
        while self._reply is None:
            await self.receive()
        return unwrap(self._reply)

    @property
    def done(self) -> bool:
        return self._done

    @property
    def finished(self) -> bool:
        """The guest has answered: sending more is pointless (`result()` says how it ended)."""
        return self._done or self._replied


def unwrap(reply: dict[str, Any]) -> Any:
    """The result of a REPLY, or its error as a `CorralError`."""
    error = reply.get("error")
    if error is not None:
        code = str(error.get("code", ""))
        message = str(error.get("message", "the guest agent reported an error"))
        if code == AgentUnavailable.default_code:
            raise AgentUnavailable(message)
        raise from_guest(code, message)
    return reply.get("result")


class _Connection:
    """One accepted connection from the guest agent."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hello: dict[str, Any]
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.hello = hello
        self.channels: dict[int, Channel] = {}
        self._ids = itertools.count(1)
        self.answered = asyncio.Event()  # set as each REPLY arrives
        self._lock = asyncio.Lock()
        self.closed = False
        self.heard_at = time.monotonic()  # when the agent last sent anything
        self.hangup: CorralError | None = None  # why the agent was asked to hang up, if it was

    async def send(self, frame: bytes) -> None:
        if self.closed:
            raise AgentUnavailable("the connection to the guest agent was lost")
        async with self._lock:
            try:
                self.writer.write(frame)
                await self.writer.drain()
            except (OSError, RuntimeError) as exc:
                self.close(AgentUnavailable(f"the connection to the guest agent was lost: {exc}"))
                raise AgentUnavailable("the connection to the guest agent was lost") from exc

    async def call(self, method: str, params: dict[str, Any], awaited: bool = False) -> Channel:
        channel = Channel(self, next(self._ids))
        channel.awaited = awaited
        self.channels[channel.id] = channel
        await self.send(P.encode_json(channel.id, P.CALL, {"method": method, "params": params}))
        return channel

    def forget(self, stream_id: int) -> None:
        self.channels.pop(stream_id, None)

    async def read_loop(self) -> None:
        try:
            while True:
                length, stream_id, kind = P.decode_header(
                    await self.reader.readexactly(P.HEADER.size)
                )
                payload = await self.reader.readexactly(length) if length else b""
                self.heard_at = time.monotonic()
                channel = self.channels.get(stream_id)
                if channel is None:
                    continue
                if kind in (P.REPLY, P.EVENT):
                    channel._deliver(kind, P.decode_json(payload))
                elif kind in P.DATA_KINDS:
                    channel._deliver(kind, payload)
                elif kind == P.WINDOW_UPDATE:
                    channel._grant(P.WINDOW.unpack(payload)[0])
        except (asyncio.IncompleteReadError, OSError, P.ProtocolError) as exc:
            lost = f"the connection to the guest agent was lost ({type(exc).__name__})"
            self.close(self.hangup or AgentUnavailable(lost))

    def close(self, error: CorralError) -> None:
        if self.closed:
            return
        self.closed = True
        for channel in list(self.channels.values()):
            channel._fail(error)
        self.channels.clear()
        self.answered.set()
        self.writer.close()


class AgentLink:
    """The host's listening end for one sandbox's guest agent.

    `secret` is the sandbox's (see `corral.agent.protocol`); None for the agent of a sandbox
    made before agents proved themselves (version 1), which is only ever adopted, never made.
    """

    def __init__(self, socket_dir: Path, sandbox_id: str, secret: bytes | None) -> None:
        self.socket_dir = socket_dir
        self.sandbox_id = sandbox_id
        self.secret = secret
        name = P.socket_name(secret) if secret is not None else P.LEGACY_SOCKET_NAME
        self.socket_path = socket_dir / name
        self._server: asyncio.AbstractServer | None = None
        self._conn: _Connection | None = None
        self._changed = asyncio.Condition()
        self._quiescing = False  # between `quiesce` and the next `listen`
        self._pending: list[asyncio.StreamWriter] = []
        self._lost_at: float | None = time.monotonic()  # since when no agent is connected
        self.waker: Callable[[], Awaitable[None]] | None = None  # thaws it (engine/doze.py)

    def write_key(self, owner: int) -> None:
        """Leave the secret where the agent, starting, reads it (owned by the sandbox's root,
        `owner` on the host); deleted once the agent has proved it holds it."""
        assert self.secret is not None
        key = self.socket_dir / P.KEY_NAME
        fd = os.open(
            key, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o400
        )
        try:
            os.fchown(fd, owner, owner)
            os.write(fd, self.secret.hex().encode())
        finally:
            os.close(fd)

    def forget_key(self) -> None:
        """Delete the key file: the agent holds the secret (it proved it), or never will."""
        with contextlib.suppress(FileNotFoundError):
            (self.socket_dir / P.KEY_NAME).unlink()

    async def listen(self) -> None:
        """Listen on the socket, replacing whatever a previous host left there."""
        if self._server is not None:  # (a quiesce that failed before it closed it)
            self._server.close()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._server = await asyncio.start_unix_server(
            self._accept, sock=bind_unix(self.socket_path)
        )
        if not self.connected:
            self._lost_at = time.monotonic()  # the agent's absence counts from now
        self._quiescing = False
        # The directory is root's and read-only inside the sandbox, so this cannot be raced.
        os.chmod(self.socket_path, 0o666)  # noqa: S103 - the sandbox must be able to connect

    async def rekey(self, secret: bytes) -> None:
        """Prove every handshake from now on with `secret`, listening under its name; the
        connection open now stays. For a sandbox restored from a boot image, once its agent
        has taken the new secret (`agent.identify`): from then on it shares none with the
        other sandboxes restored from that image."""
        old = self.socket_path
        self.secret = secret
        self.socket_path = self.socket_dir / P.socket_name(secret)
        if self._server is not None:
            self._server.close()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
            await self.listen()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._pending.append(writer)
        if len(self._pending) > MAX_HANDSHAKES:  # someone inside opens connections in bulk
            self._pending.pop(0).close()
        try:
            hello = await asyncio.wait_for(self._handshake(reader, writer), HELLO_TIMEOUT)
        except BaseException as exc:  # cancelled too: the connection must not be left open
            writer.close()
            if isinstance(exc, TimeoutError | asyncio.IncompleteReadError | OSError):
                return
            if isinstance(exc, P.ProtocolError):
                return
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._pending.remove(writer)
        if writer.is_closing():  # dropped while it handshook
            return
        self.forget_key()
        conn = _Connection(reader, writer, hello)
        async with self._changed:
            if self._conn is not None:
                self._conn.close(AgentUnavailable("the guest agent reconnected"))
            self._conn = conn
            self._lost_at = None
            self._changed.notify_all()
        try:
            await conn.read_loop()
        finally:
            async with self._changed:
                if self._conn is conn:
                    self._conn = None
                    self._lost_at = time.monotonic()
                self._changed.notify_all()

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> dict[str, Any]:
        """The HELLO of a connection that proves it is the agent; `ProtocolError` else."""
        challenge = secrets.token_bytes(32)
        if self.secret is not None:
            writer.write(P.encode(0, P.CHALLENGE, challenge))
            await writer.drain()
        length, _stream, kind = P.decode_header(await reader.readexactly(P.HEADER.size))
        if kind != P.HELLO or length > 4096:
            raise P.ProtocolError(f"unexpected first frame (kind {kind})")
        hello = P.decode_json(await reader.readexactly(length))
        if self.secret is None:  # an agent from before version 2, adopted
            if hello.get("version") != 1:
                raise P.ProtocolError(f"unexpected agent protocol version {hello.get('version')}")
            return hello
        if hello.get("version") != P.VERSION:
            raise P.ProtocolError(f"unsupported agent protocol version {hello.get('version')}")
        answer = hello.get("proof")
        expected = P.proof(self.secret, challenge)
        if not isinstance(answer, str) or not hmac.compare_digest(answer, expected):
            raise P.ProtocolError("the connection could not prove it is the sandbox's agent")
        return hello

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.closed

    @property
    def streams(self) -> bool:  # whether a call (one answer, or a stream) is under way
        return self._conn is not None and any(not c.finished for c in self._conn.channels.values())

    def silence(self) -> float:
        """Seconds the agent has kept silent while calls wait for it (0 if none waits): long
        silence under a call means a stopped agent, or a command that prints nothing."""
        conn = self._conn
        if conn is None or conn.closed or not conn.channels:
            return 0.0
        return time.monotonic() - conn.heard_at

    def absence(self) -> float:
        """Seconds since the agent was last connected (0 while it is)."""
        return 0.0 if self._lost_at is None else time.monotonic() - self._lost_at

    @property
    def hello(self) -> dict[str, Any]:
        return self._conn.hello if self._conn is not None else {}

    async def wait_connected(self, timeout: float) -> None:
        """Wait until the guest agent is connected, or raise `AgentUnavailable`."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: self.connected and not self._quiescing)
        except TimeoutError:
            raise AgentUnavailable(
                f"the guest agent of sandbox {self.sandbox_id} did not connect within {timeout:g}s"
            ) from None

    async def open(
        self,
        method: str,
        params: dict[str, Any],
        connect_timeout: float = 10.0,
        *,
        awaited: bool = False,
    ) -> Channel:
        """Send a CALL and return its channel (`awaited`: its caller waits for its end, which
        a quiesce lets come first)."""
        if self.waker is not None:  # the sandbox dozes: it thaws first
            await self.waker()
        if self._quiescing:  # a checkpoint's moment: wait for the agent to dial back
            await self.wait_connected(connect_timeout)
        if self._server is None:
            raise AgentUnavailable(f"sandbox {self.sandbox_id} is not listening for its agent")
        if not self.connected:
            await self.wait_connected(connect_timeout)
        assert self._conn is not None
        return await self._conn.call(method, params, awaited)

    async def call(self, method: str, params: dict[str, Any]) -> Any:
        """A CALL whose only answer is its REPLY."""
        channel = await self.open(method, params, awaited=True)
        return await channel.result()

    async def stream(self, method: str, params: dict[str, Any]) -> AsyncIterator[tuple[int, Any]]:
        """Every frame of a CALL's stream up to and including its REPLY (cancelled if abandoned)."""
        channel = await self.open(method, params)
        try:
            while True:
                kind, payload = await channel.receive()
                yield kind, payload
                if kind == P.REPLY:
                    return
        finally:
            if not channel.done:
                await channel.cancel()

    async def quiesce(self, timeout: float = 5.0) -> None:
        """Stop listening and have the agent hang up, so that the sandbox holds no host socket
        (gVisor cannot checkpoint one). The agent re-dials until `listen`; streams open now
        end, their processes do not. Awaited calls already sent end first, for up to
        `timeout`; new calls wait for the agent to dial back. A dozing sandbox thaws first."""
        if self.waker is not None:
            await self.waker()
        self._quiescing = True
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(OSError):
            self.socket_path.unlink()
        self._drop_pending()
        conn = self._conn
        if conn is None or conn.closed:
            return
        with contextlib.suppress(TimeoutError):  # a call still unanswered then fails
            async with asyncio.timeout(timeout):
                while any(c.awaited and not c.finished for c in conn.channels.values()):
                    conn.answered.clear()
                    await conn.answered.wait()
        conn.hangup = AgentUnavailable(
            f"sandbox {self.sandbox_id} was checkpointed (a snapshot, fork or hibernation) "
            f"while this call ran and had to end its stream; a process it started runs on "
            f"(see its processes), so ask again once the checkpoint is over"
        )
        try:
            await conn.send(P.encode(0, P.QUIESCE))
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: self._conn is not conn)
        except (OSError, TimeoutError, CorralError):
            conn.close(AgentUnavailable(f"sandbox {self.sandbox_id} is being suspended"))
            raise AgentUnavailable(
                f"the guest agent of sandbox {self.sandbox_id} did not hang up when asked"
            ) from None

    def _drop_pending(self) -> None:
        for writer in self._pending:
            writer.close()
        self._pending.clear()

    async def close(self) -> None:
        """Stop listening and drop the connection; the agent keeps re-dialling in vain."""
        if self._server is not None:
            self._server.close()
            self._server = None
        closing = [*self._pending]
        self._drop_pending()
        if self._conn is not None:
            closing.append(self._conn.writer)
            self._conn.close(AgentUnavailable(f"sandbox {self.sandbox_id} is shutting down"))
            self._conn = None
        with contextlib.suppress(OSError):
            self.socket_path.unlink()
        for writer in closing:
            with contextlib.suppress(OSError):
                await writer.wait_closed()
