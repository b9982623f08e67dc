"""The nameservers Corral's resolver and proxy ask: the host's, or the operator's choice."""

from __future__ import annotations

import ipaddress
import logging

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.rdatatype

log = logging.getLogger("corral.egress")

UPSTREAM_TIMEOUT = 3.0  # seconds per upstream nameserver


class Upstream:
    """The nameservers Corral asks, in order."""

    def __init__(self, servers: tuple[str, ...]) -> None:
        self.servers = servers

    async def ask(self, query: dns.message.Message) -> dns.message.Message | None:
        """The first upstream's answer to `query` (None: none answered)."""
        for server in self.servers:
            try:
                answer = await dns.asyncquery.udp(query, server, timeout=UPSTREAM_TIMEOUT)
                if answer.flags & dns.flags.TC:
                    answer = await dns.asyncquery.tcp(query, server, timeout=UPSTREAM_TIMEOUT)
            except (OSError, dns.exception.DNSException) as exc:
                log.warning("nameserver %s did not answer: %s", server, exc)
                continue
            return answer
        return None

    async def addresses(self, name: str) -> list[tuple[ipaddress.IPv4Address, float]]:
        """`name`'s IPv4 addresses with their TTLs, as the upstream says (none for a name DNS
        cannot even ask about)."""
        try:
            query = dns.message.make_query(name, dns.rdatatype.A)
        except (dns.exception.DNSException, ValueError):
            return []
        answer = await self.ask(query)
        if answer is None:
            return []
        return [
            (ipaddress.IPv4Address(rdata.address), float(rrset.ttl))
            for rrset in answer.answer
            if rrset.rdtype == dns.rdatatype.A
            for rdata in rrset
        ]
