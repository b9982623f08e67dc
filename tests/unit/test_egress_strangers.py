"""Corral's resolver and egress proxy listen on every address (the firewall sends sandboxes'
packets to them), so anyone who can reach the machine can reach them too. They serve only
sandboxes' addresses: a stranger (the host itself, or another machine, here its address on
eth0) gets REFUSED or a reset, and nothing is asked or dialled on its behalf, even when every
sandbox the engine knows would be allowed everything."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator

import dns.flags
import dns.message
import dns.rcode
import pytest

from corral.core.egress import EgressPolicy
from corral.engine.egress import Egress, EgressSettings

QUESTION = dns.message.make_query("example.com.", "A")
UPSTREAM = "127.0.0.77"


def _addresses() -> list[str]:
    """Loopback, and this machine's own outward address where it has one."""
    found = ["127.0.0.1"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: it only picks a route
            found.append(probe.getsockname()[0])
        except OSError:
            pass
    return sorted(set(found))


class Upstream(asyncio.DatagramProtocol):
    """A nameserver that records every question it is asked."""

    def __init__(self) -> None:
        self.asked: list[bytes] = []

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.asked.append(data)


@pytest.fixture
async def egress() -> AsyncIterator[tuple[Egress, Upstream]]:
    loop = asyncio.get_running_loop()
    upstream = Upstream()
    # Nameservers are asked on port 53; any address of 127/8 is loopback's.
    transport, _ = await loop.create_datagram_endpoint(lambda: upstream, (UPSTREAM, 53))
    # Every sandbox slot is someone's, allowed everything: only the address check refuses.
    settings = EgressSettings(upstream=(UPSTREAM,))
    started = Egress(settings, lambda slot: ("sb-anyone", EgressPolicy()))
    await started.start()
    yield started, upstream
    await started.close()
    transport.close()


@pytest.mark.parametrize("source", _addresses())
async def test_a_stranger_gets_no_answer_and_no_connection(
    egress: tuple[Egress, Upstream], source: str
) -> None:
    engine_egress, upstream = egress
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(10):  # hang bound only
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((source, 0))
            udp.setblocking(False)
            await loop.sock_sendto(udp, QUESTION.to_wire(), (source, engine_egress.resolver.port))
            reply = dns.message.from_wire(await loop.sock_recv(udp, 4096))
        assert (
            reply.flags & dns.flags.QR and reply.rcode() == dns.rcode.REFUSED and not reply.answer
        )

        reader, writer = await asyncio.open_connection(
            source, engine_egress.resolver.port, local_addr=(source, 0)
        )
        wire = QUESTION.to_wire()
        writer.write(struct.pack("!H", len(wire)) + wire)
        (length,) = struct.unpack("!H", await reader.readexactly(2))
        assert dns.message.from_wire(await reader.readexactly(length)).rcode() == dns.rcode.REFUSED
        writer.close()

        reader, writer = await asyncio.open_connection(
            source, engine_egress.proxy.port, local_addr=(source, 0)
        )
        writer.write(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await reader.readexactly(1)  # reset, or closed with nothing said
        writer.close()
    assert upstream.asked == []  # nothing was resolved on a stranger's behalf
