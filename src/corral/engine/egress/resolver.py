"""Corral's resolver: the only DNS an internet sandbox gets.

Every DNS packet a sandbox sends, to whatever address, is redirected here (UDP and TCP). A
question is answered only if the sandbox's rules allow its name: a refused name is never sent
on (so DNS cannot carry data out to a name's own servers), and is answered REFUSED. Allowed
names are asked of the upstream nameservers; the answer keeps only the IPv4 addresses the rules
allow (never private, loopback, link-local or metadata ones: a name cannot point a sandbox at
the host's network), drops IPv6 (sandboxes have none) and what the additional section carries,
and tells `Guard` which names each address was given for.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import socket
import struct
from typing import Any, cast

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.rrset

from corral.core.egress import Denial, always_denied, normal_name
from corral.engine.egress.guard import Guard, Sandbox

log = logging.getLogger("corral.egress")

TCP_IDLE = 10.0  # seconds a DNS-over-TCP connection may sit without a question
MAX_TCP_CONNECTIONS = 256
TCP_PER_SANDBOX = 8  # DNS-over-TCP connections one sandbox may hold
PENDING = 1024  # UDP questions being answered at once
PENDING_PER_SANDBOX = 64


class Resolver:
    """The DNS server sandboxes' packets are redirected to (one port for UDP and TCP)."""

    def __init__(self, guard: Guard) -> None:
        self._guard = guard
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tcp_slots = asyncio.Semaphore(MAX_TCP_CONNECTIONS)
        self._streams: collections.Counter[str] = collections.Counter()  # by source address
        self.port = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(20):  # UDP takes a free port; TCP wants the same one
            udp, _protocol = await loop.create_datagram_endpoint(
                lambda: _Datagrams(self),
                local_addr=("0.0.0.0", 0),  # noqa: S104
            )
            port = int(udp.get_extra_info("sockname")[1])
            try:
                self._tcp = await asyncio.start_server(self._stream, "0.0.0.0", port)  # noqa: S104
            except OSError:
                udp.close()
                continue
            self._udp, self.port = udp, port
            return
        raise OSError("no free port for Corral's resolver")

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._tcp.wait_closed(), 5)

    async def answer(self, wire: bytes, source: str, protocol: str) -> bytes | None:
        """The answer to the DNS message `wire` that `source` sent (None: no answer at all)."""
        try:
            query = dns.message.from_wire(wire)
        except (dns.exception.DNSException, ValueError, struct.error):
            return None  # not DNS: nothing to answer
        if query.flags & dns.flags.QR:
            return None  # an answer sent to us: ignore it
        sandbox = self._guard.sandbox_at(source)
        if sandbox is None or query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            code = dns.rcode.REFUSED if sandbox is None else dns.rcode.NOTIMP
            return _reply(query, code, protocol)
        question = query.question[0]
        name = normal_name(question.name.to_text())
        denial = _host_side(name) or self._guard.refusal(sandbox, [name], None)
        if denial is not None:
            self._guard.deny(sandbox, denial, destination=name, port=53, protocol="dns")
            return _reply(query, dns.rcode.REFUSED, protocol)
        if question.rdtype == dns.rdatatype.AAAA:
            return _reply(query, dns.rcode.NOERROR, protocol)  # no IPv6 in sandboxes
        ask = dns.message.make_query(question.name, question.rdtype, question.rdclass)
        upstream = await self._guard.upstream.ask(ask)
        if upstream is None:
            return _reply(query, dns.rcode.SERVFAIL, protocol)
        return self._filtered(query, upstream, sandbox, name, protocol)

    def _filtered(
        self,
        query: dns.message.Message,
        upstream: dns.message.Message,
        sandbox: Sandbox,
        name: str,
        protocol: str,
    ) -> bytes | None:
        reply = dns.message.make_response(query)
        reply.set_rcode(upstream.rcode())
        refused = None
        # A name the rules deny is refused as the target of an allowed name's CNAME too.
        targets = [normal_name(r.target.to_text()) for rrset in upstream.answer
                   if rrset.rdtype == dns.rdatatype.CNAME for r in rrset]  # fmt: skip
        if targets and (denial := self._guard.refusal(sandbox, targets, None)) and denial.definite:
            self._guard.deny(sandbox, denial, destination=f"{name} ({targets[-1]})", port=53,
                             protocol="dns")  # fmt: skip
            return _reply(query, dns.rcode.REFUSED, protocol)
        learn = self._guard.names_matter(sandbox)
        for rrset in upstream.answer:
            if rrset.rdtype in _DROPPED:
                continue
            if rrset.rdtype == dns.rdatatype.A:
                kept = []
                for rdata in rrset:
                    address = ipaddress.IPv4Address(rdata.address)
                    denial = self._guard.refusal(sandbox, [name], address)
                    if denial is None:
                        if learn:
                            sandbox.learn(address, name, float(rrset.ttl))
                        kept.append(rdata)
                    else:
                        refused = refused or (denial, address)
                if not kept:
                    continue
                rrset = dns.rrset.from_rdata_list(rrset.name, rrset.ttl, kept)
            reply.answer.append(rrset)
        if refused is not None and not any(r.rdtype == dns.rdatatype.A for r in reply.answer):
            denial, address = refused
            self._guard.deny(
                sandbox, denial, destination=f"{name} ({address})", port=53, protocol="dns"
            )
            return _reply(query, dns.rcode.REFUSED, protocol)
        reply.authority = [r for r in upstream.authority if r.rdtype == dns.rdatatype.SOA]
        return _wire(reply, protocol)

    async def _stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """DNS over TCP: two-byte lengths, then messages, any number per connection."""
        source = str(writer.get_extra_info("peername")[0])
        if self._tcp_slots.locked() or self._streams[source] >= TCP_PER_SANDBOX:
            writer.close()
            return
        self._streams[source] += 1
        async with self._tcp_slots:
            try:
                while True:
                    size = int.from_bytes(
                        await asyncio.wait_for(reader.readexactly(2), TCP_IDLE), "big"
                    )
                    wire = await asyncio.wait_for(reader.readexactly(size), TCP_IDLE)
                    reply = await self.answer(wire, source, "tcp")
                    if reply is None:
                        break
                    writer.write(len(reply).to_bytes(2, "big") + reply)
                    await writer.drain()
            except (TimeoutError, OSError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()
                self._streams[source] -= 1
                if not self._streams[source]:
                    del self._streams[source]


# Answers a sandbox never gets: IPv6 (it has none), and service bindings whose address hints
# would bypass the A filter (clients fall back to A records).
_DROPPED = (dns.rdatatype.AAAA, dns.rdatatype.SVCB, dns.rdatatype.HTTPS)
_HOST_ZONES = ("local", "internal", "localhost", "localdomain", "home.arpa", "lan", "intranet")


def _host_side(name: str) -> Denial | None:
    """A question about the host's own network, which its resolvers may answer: single-label
    names, private zones, and reverse lookups of private addresses."""
    if (
        "." not in name
        or name.endswith(tuple("." + zone for zone in _HOST_ZONES))
        or (name in _HOST_ZONES)
    ):
        return Denial("always denied: a name of the host's network")
    if name.endswith(".in-addr.arpa"):
        octets = name.removesuffix(".in-addr.arpa").split(".")[::-1]
        with contextlib.suppress(ValueError):
            address = ".".join((octets + ["0"] * 4)[:4]) + f"/{8 * len(octets)}"
            block = ipaddress.IPv4Network(address)
            if always_denied(block.network_address) is not None:
                return Denial("always denied: a reverse lookup of a private address")
    return None


def _reply(query: dns.message.Message, rcode: dns.rcode.Rcode, protocol: str) -> bytes | None:
    return _wire(dns.message.make_response(query), protocol, rcode)


def _wire(
    reply: dns.message.Message, protocol: str, rcode: dns.rcode.Rcode | None = None
) -> bytes | None:
    if rcode is not None:
        reply.set_rcode(rcode)
    asked = reply.request_payload if reply.request_payload else 512  # what the client takes
    limit = 65535 if protocol == "tcp" else max(512, min(asked, 4096))
    try:
        return reply.to_wire(max_size=limit)
    except dns.exception.TooBig:
        reply.answer = []
        reply.authority = []
        reply.flags |= dns.flags.TC  # the client asks again over TCP
        return reply.to_wire()


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, resolver: Resolver) -> None:
        self._resolver = resolver
        self._transport: asyncio.DatagramTransport | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._asking: collections.Counter[str] = collections.Counter()  # by source address

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)
        sock = transport.get_extra_info("socket")
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        source = str(addr[0])
        if len(self._pending) >= PENDING or self._asking[source] >= PENDING_PER_SANDBOX:
            return  # a flood: dropped, and one sandbox's cannot crowd out the others'
        self._asking[source] += 1
        task = asyncio.ensure_future(self._answer(data, addr))
        self._pending.add(task)
        task.add_done_callback(lambda done: self._done(done, source))

    def _done(self, task: asyncio.Task[None], source: str) -> None:
        self._pending.discard(task)
        self._asking[source] -= 1
        if not self._asking[source]:
            del self._asking[source]

    async def _answer(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        try:
            reply = await self._resolver.answer(data, str(addr[0]), "udp")
        except Exception:
            log.exception("the resolver failed on a question from %s", addr[0])
            return
        if reply is not None and self._transport is not None:
            self._transport.sendto(reply, addr)
