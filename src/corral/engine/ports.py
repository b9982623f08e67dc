"""TCP connections to ports inside sandboxes, through their guest agents (see
`corral.agent.ports`): what previews and port forwarding are built on. No network joins the
host and the sandbox, so this works for sandboxes without network and under every runtime."""

from __future__ import annotations

import asyncio
import time

from corral.agent import protocol as P
from corral.core.errors import AgentUnavailable, InvalidRequest, PortClosed, SandboxFailed
from corral.engine.access import Access
from corral.engine.agentlink import Channel, unwrap
from corral.engine.commands import explain_loss

RETRY_EVERY = 0.1  # seconds between tries while waiting for a port to open


class PortStream:
    """One TCP connection to a port in a sandbox: bytes both ways, then the end.

    Example:
        >>> stream = await engine.connect_port(sandbox_id, 8000)
        >>> await stream.send(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
        >>> await stream.receive()  # the response's first bytes; None once it has closed
    """

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self.closed = False

    async def send(self, data: bytes) -> None:
        if data and not self._channel.finished:
            await self._channel.send_data(P.FILE, data)

    async def send_eof(self) -> None:
        """The end of what we send (the sandbox's side sees it if `half_close` was asked)."""
        await self._channel.send_eof(P.FILE)

    async def receive(self) -> bytes | None:
        """The next bytes from the port, or None once the connection has closed."""
        while not self.closed:
            kind, payload = await self._channel.receive()
            if kind == P.FILE:
                return bytes(payload)
            if kind == P.REPLY:
                self.closed = True
                unwrap(payload)
        return None

    async def close(self) -> None:
        """Close the connection (the sandbox's side sees it closed)."""
        if not self._channel.done:
            await self._channel.cancel()
        self.closed = True


class Ports:
    """Opens `PortStream`s into sandboxes."""

    def __init__(self, access: Access) -> None:
        self._access = access

    async def connect(
        self,
        sandbox_id: str,
        port: int,
        *,
        wait: float = 0.0,
        half_close: bool = False,
        passive: bool = False,
    ) -> PortStream:
        """Connect to `port` on the sandbox's loopback, waking it first if it sleeps; for up
        to `wait` seconds, a port nothing listens on yet is tried again. A `passive` connection
        (a health check) neither wakes the sandbox nor counts as a use of it."""
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise InvalidRequest("port must be a whole number from 1 to 65535")
        deadline = time.monotonic() + wait
        while True:
            try:
                return await self._connect(sandbox_id, port, half_close, passive)
            except PortClosed:
                if time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(RETRY_EVERY)

    async def _connect(
        self, sandbox_id: str, port: int, half_close: bool, passive: bool
    ) -> PortStream:
        action = "connect to a port of"
        if passive:
            record = self._access.running(sandbox_id, action, use=False)
        else:
            record = await self._access.use(sandbox_id, action)
        try:
            channel = await record.link.open(
                P.PORT_CONNECT, {"port": port, "half_close": half_close}
            )
            kind, payload = await channel.receive()
        except AgentUnavailable as exc:
            if record.ending or not record.alive:
                raise await explain_loss(record, exc) from exc
            raise
        if kind == P.REPLY:
            unwrap(payload)  # port_closed, or the agent's own error
            raise SandboxFailed("the guest agent closed the connection before it opened")
        if kind != P.EVENT or payload.get("type") != "connected":
            await channel.cancel()
            raise SandboxFailed(f"unexpected first frame from the guest agent: {kind}")
        return PortStream(channel)
