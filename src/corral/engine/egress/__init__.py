"""Egress policy enforced on the host: Corral's resolver, its TCP proxy and the firewall's rules.

An internet sandbox's traffic leaves through its veth on the host, where nothing inside it can
reach (`corral.host.network`). There, every DNS packet it sends goes to `Resolver`, whatever
address it was for; the TCP of a sandbox with rules (its own or the operator's) goes to `Proxy`,
which reads the TLS SNI or HTTP Host of ports 80 and 443 and connects to the address Corral
resolves for that name, not the one the sandbox dialled; its other traffic is let out by
address in the kernel (`network.filter_sandbox`). `Guard` holds what resolver and proxy share.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

from corral.core.egress import EgressPolicy
from corral.engine.egress.guard import EgressSettings, Guard, Lookup, OnDenied
from corral.engine.egress.proxy import Proxy
from corral.engine.egress.resolver import Resolver
from corral.host import network
from corral.host.scope import HostScope

__all__ = ["Egress", "EgressSettings", "OnDenied"]


class Egress:
    """The host's side of every internet sandbox's network: resolver, proxy, firewall rules."""

    def __init__(
        self, settings: EgressSettings, lookup: Lookup, scope: HostScope | None = None
    ) -> None:
        self.scope = scope or HostScope()  # whose firewall table the rules go in
        self.guard = Guard(settings, lookup)
        self.resolver = Resolver(self.guard)
        self.proxy = Proxy(self.guard)
        self._filtered: set[int] = set()
        self._started = False
        self._starting = asyncio.Lock()  # concurrent first creates start it once

    @property
    def denials(self) -> dict[str, collections.deque[dict[str, Any]]]:
        """Each live sandbox's recent denials, oldest first."""
        return self.guard.denials

    async def start(self) -> tuple[int, int]:
        """Start the resolver and the proxy (once); their ports (DNS, TCP)."""
        async with self._starting:
            if not self._started:
                await self.guard.read_host()  # before any decision: the host is never reached
                await self.resolver.start()
                await self.proxy.start()
                self._started = True
        return self.resolver.port, self.proxy.port

    async def close(self) -> None:
        if self._started:
            await self.proxy.close()
            await self.resolver.close()
            self._started = False

    def restricts(self, policy: EgressPolicy | None) -> bool:
        return self.guard.settings.floor.restricts or (policy is not None and policy.restricts)

    def rules(self, slot: int, policy: EgressPolicy | None) -> network.SandboxRules | None:
        """What the firewall holds for the sandbox in slot `slot` (None: nothing, it has no
        rules and neither has the floor)."""
        if not self.restricts(policy):
            return None
        floor, own = self.guard.settings.floor, policy or EgressPolicy()
        deny = floor.blocks(allowed=False) + own.blocks(allowed=False)
        return slot, deny, _allowed_blocks(floor, own)

    def installed(self, slots: list[int]) -> None:
        """The firewall was written with these slots' rules in it."""
        self._filtered = set(slots)

    async def apply(self, slot: int, policy: EgressPolicy | None) -> None:
        """Put the sandbox in slot `slot` under `policy` (and the floor) in the firewall."""
        rules = self.rules(slot, policy)
        if rules is None:
            await self._unfilter(slot)
            return
        await asyncio.to_thread(network.filter_sandbox, self.scope, *rules)
        self._filtered.add(slot)

    async def forget(self, sandbox_id: str, slot: int) -> None:
        """The sandbox ended: drop what is kept of it."""
        self.guard.forget(sandbox_id)
        await self._unfilter(slot)

    async def _unfilter(self, slot: int) -> None:
        if slot in self._filtered:
            self._filtered.discard(slot)
            await asyncio.to_thread(network.unfilter_sandbox, self.scope, slot)


def _allowed_blocks(floor: EgressPolicy, own: EgressPolicy) -> tuple[str, ...] | None:
    """The blocks other traffic may go to: both lists' where both have one (None: anywhere).
    Blocks are checked in the kernel, which needs one list; where both policies allow by
    block, only blocks of one inside a block of the other are kept."""
    lists = [policy.allow for policy in (floor, own) if policy.allow is not None]
    if not lists:
        return None
    blocks = [[rule.block for rule in rules if rule.block is not None] for rules in lists]
    if len(blocks) == 1:
        return tuple(str(block) for block in blocks[0])
    first, second = blocks
    kept = [a for a in first if any(a.subnet_of(b) for b in second)]
    kept += [b for b in second if any(b.subnet_of(a) for a in first) and b not in kept]
    return tuple(str(block) for block in kept)
