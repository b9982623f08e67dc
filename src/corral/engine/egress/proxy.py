"""Corral's egress proxy: every TCP connection of a sandbox with rules comes here first.

The firewall redirects the connection to this listener, which reads where it was going
(SO_ORIGINAL_DST) and decides. On ports 80 and 443 the first bytes name the host (TLS SNI, HTTP
Host: `sniff`); a named connection goes to the address Corral resolves for the name, never the
one the sandbox dialled, so /etc/hosts or a DNS server of the sandbox's own change nothing. A
connection without a name, and every other port, is decided by its address: a CIDR rule, or a
name the sandbox resolved to that address through Corral. A refusal is a TCP reset, at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import socket
import struct

from corral.core.egress import Denial
from corral.engine.egress.guard import Guard, Sandbox
from corral.engine.egress.sniff import MAX_HEAD, NeedMore, name_of

log = logging.getLogger("corral.egress")

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
NAMED_PORTS = (80, 443)
HEAD_TIMEOUT = 10.0  # seconds a client on 80/443 has to say which host it wants
CONNECT_TIMEOUT = 10.0
CHUNK = 64 * 1024
MAX_CONNECTIONS = 4096
PER_SANDBOX = 256  # open connections one sandbox may hold through the proxy


class Proxy:
    """The transparent TCP proxy the firewall sends proxied sandboxes' connections to."""

    def __init__(self, guard: Guard) -> None:
        self._guard = guard
        self._server: asyncio.Server | None = None
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)
        self._open: collections.Counter[str] = collections.Counter()  # by source address
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accepted, "0.0.0.0", 0)  # noqa: S104
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            source = str(writer.get_extra_info("peername")[0])
            if self._slots.locked() or self._open[source] >= PER_SANDBOX:
                _reset(writer)  # one sandbox cannot take every slot from the others
                return
            self._open[source] += 1
            try:
                async with self._slots:
                    await self._serve(reader, writer, source)
            finally:
                self._open[source] -= 1
                if not self._open[source]:
                    del self._open[source]
        except (OSError, asyncio.IncompleteReadError) as exc:
            log.debug("egress connection ended: %s", exc)
        except asyncio.CancelledError:
            # Only `close` cancels these. Ending normally keeps asyncio's stream callback from
            # logging the cancellation as an error.
            _reset(writer)
        finally:
            self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, source: str
    ) -> None:
        sandbox = self._guard.sandbox_at(source)
        if sandbox is None:
            _reset(writer)
            return
        address, port = _original_destination(writer.get_extra_info("socket"))
        head = b""
        name = None
        # An address a rule (or the floor) denies is refused at once, whatever name may come.
        denial = self._guard.refusal(sandbox, [], address)
        if port in NAMED_PORTS and (denial is None or not denial.definite):
            head, name = await _head(reader)
            if not head and reader.at_eof():
                return  # it left without a word: nothing to connect for
        if denial is None or not denial.definite:
            target, denial = await self._target(sandbox, name, address)
        else:
            target = None
        if denial is not None or target is None:
            self._guard.deny(
                sandbox,
                denial or Denial("no address", reason="no_address"),
                destination=name or str(address),
                port=port,
                protocol="tcp",
            )
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(str(target), port), CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError):
            _reset(writer)  # as the sandbox would have seen it without the proxy
            return
        try:
            up_writer.write(head)
            await _splice(reader, writer, up_reader, up_writer)
        finally:
            with contextlib.suppress(Exception):
                up_writer.close()

    async def _target(
        self, sandbox: Sandbox, name: str | None, address: ipaddress.IPv4Address
    ) -> tuple[ipaddress.IPv4Address | None, Denial | None]:
        """Where a connection to `address` naming `name` goes, or why it may not."""
        guard = self._guard
        if name is None:
            return address, guard.refusal(sandbox, sandbox.names_of(address), address)
        by_name = guard.refusal(sandbox, [name], None)
        if by_name is None:  # only names the rules allow are ever resolved
            resolved = [found for found, _ in await guard.upstream.addresses(name)]
            allowed = [a for a in resolved if guard.refusal(sandbox, [name], a) is None]
            if allowed:
                return (address if address in allowed else allowed[0]), None
            if not resolved:
                return None, Denial(f"{name} has no address", reason="no_address")
            return None, guard.refusal(sandbox, [name], resolved[0])
        if not by_name.definite and guard.refusal(sandbox, [], address) is None:
            return address, None  # not allowed by its name, but the address is, by block
        return None, by_name


async def _head(reader: asyncio.StreamReader) -> tuple[bytes, str | None]:
    """The connection's first bytes, up to the end of a ClientHello or request head, and the
    name they give (None: none, or the client said nothing in time)."""
    head = b""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HEAD_TIMEOUT
    while True:
        try:
            return head, name_of(head)
        except NeedMore:
            pass
        left = deadline - loop.time()
        if left <= 0 or len(head) >= MAX_HEAD:
            return head, None
        try:
            chunk = await asyncio.wait_for(reader.read(MAX_HEAD - len(head)), left)
        except TimeoutError:
            return head, None
        if not chunk:
            return head, None
        head += chunk


def _original_destination(sock: socket.socket) -> tuple[ipaddress.IPv4Address, int]:
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return ipaddress.IPv4Address(packed), int(port)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset: the sandbox's process learns at once that it was refused."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _splice(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
) -> None:
    """Copy both ways until both sides have finished (half-closes passed on)."""

    async def copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while chunk := await source.read(CHUNK):
                sink.write(chunk)
                await sink.drain()
            if sink.can_write_eof():
                sink.write_eof()
        except OSError:
            sink.transport.abort()

    await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))
