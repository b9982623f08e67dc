"""What Corral's resolver and egress proxy share: which sandbox a source address is, what it
resolved through Corral, the decision (`corral.core.egress.decide`, plus the host's own
addresses), and each denial, kept and announced as an event."""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from corral.core.egress import Denial, EgressPolicy, decide
from corral.engine.egress.upstream import Upstream
from corral.host import network

log = logging.getLogger("corral.egress")

DENIALS_KEPT = 100  # recent denials per sandbox
LEARNED_TTL = (30.0, 3600.0)  # how long a resolved address counts as its name's, at least/most
LEARNED_KEPT = 4096  # addresses remembered per sandbox
HOST_ADDRESSES_EVERY = 10.0  # seconds between looks at the host's own addresses


Lookup = Callable[[int], tuple[str, EgressPolicy | None] | None]
OnDenied = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class EgressSettings:
    """The operator's part: the floor every sandbox's rules sit under, and where Corral's
    resolver asks (None: the host's own nameservers)."""

    floor: EgressPolicy = field(default_factory=EgressPolicy)
    upstream: tuple[str, ...] | None = None
    on_denied: OnDenied | None = None  # told of each denial (sandbox id, event)


@dataclass
class Sandbox:
    """What the resolver and proxy need of one internet sandbox."""

    id: str
    policy: EgressPolicy
    learned: dict[ipaddress.IPv4Address, dict[str, float]] = field(default_factory=dict)

    def learn(self, address: ipaddress.IPv4Address, name: str, ttl: float) -> None:
        low, high = LEARNED_TTL
        if address not in self.learned and len(self.learned) >= LEARNED_KEPT:
            self._forget_expired()
            if len(self.learned) >= LEARNED_KEPT:  # still full: the oldest address goes
                del self.learned[next(iter(self.learned))]
        self.learned.setdefault(address, {})[name] = time.monotonic() + min(max(ttl, low), high)

    def _forget_expired(self) -> None:
        now = time.monotonic()
        for address, names in list(self.learned.items()):
            for name in [name for name, until in names.items() if until < now]:
                del names[name]
            if not names:
                del self.learned[address]

    def names_of(self, address: ipaddress.IPv4Address) -> list[str]:
        """The names the sandbox resolved to `address` (and whose answers still count)."""
        now = time.monotonic()
        names = self.learned.get(address, {})
        for name in [name for name, until in names.items() if until < now]:
            del names[name]
        return list(names)


class Guard:
    """Decisions and denials for every internet sandbox of one engine."""

    def __init__(self, settings: EgressSettings, lookup: Lookup) -> None:
        self.settings = settings
        self._lookup = lookup
        self.sandboxes: dict[str, Sandbox] = {}
        self.denials: dict[str, collections.deque[dict[str, Any]]] = {}
        self._host: frozenset[str] = frozenset()
        self._host_read = time.monotonic()
        self._reading: asyncio.Future[None] | None = None
        self.upstream = Upstream(settings.upstream or network.nameservers())

    def sandbox_at(self, address: str) -> Sandbox | None:
        """The internet sandbox whose address `address` is (None: nobody's)."""
        slot = network.slot_of(address)
        found = self._lookup(slot) if slot is not None else None
        if found is None:
            return None
        sandbox_id, policy = found
        sandbox = self.sandboxes.get(sandbox_id)
        if sandbox is None:
            sandbox = self.sandboxes[sandbox_id] = Sandbox(sandbox_id, EgressPolicy())
        sandbox.policy = policy or EgressPolicy()
        return sandbox

    def names_matter(self, sandbox: Sandbox) -> bool:
        """Whether the sandbox's connections are decided by names it resolved (it has rules)."""
        return self.settings.floor.restricts or sandbox.policy.restricts

    def refusal(
        self, sandbox: Sandbox, names: Sequence[str], address: ipaddress.IPv4Address | None
    ) -> Denial | None:
        """Why `sandbox` may not connect to `address` known as `names` (None: it may)."""
        if address is not None and str(address) in self._host_addresses():
            return Denial("always denied: the host")
        return decide(sandbox.policy, self.settings.floor, names, address)

    async def read_host(self) -> None:
        """Read the host's own addresses (in a thread: `ip` never runs on the event loop)."""
        self._host = await asyncio.to_thread(network.host_addresses)

    def _host_addresses(self) -> frozenset[str]:
        """The host's addresses as last read; a new reading starts, in the background, once
        the last is `HOST_ADDRESSES_EVERY` seconds old (the engine reads them at start)."""
        if time.monotonic() - self._host_read > HOST_ADDRESSES_EVERY:
            self._host_read = time.monotonic()
            self._reading = asyncio.ensure_future(self.read_host())
            self._reading.add_done_callback(_logged)
        return self._host

    def deny(
        self,
        sandbox: Sandbox,
        denial: Denial,
        *,
        destination: str,
        port: int,
        protocol: str,
    ) -> None:
        """Record and announce that `sandbox` was refused `destination`."""
        event = {
            "type": "sandbox.egress_denied",
            "sandbox_id": sandbox.id,
            "reason": denial.reason,
            "rule": denial.rule,
            "destination": destination,
            "port": port,
            "protocol": protocol,
            "at": time.time(),
        }
        log.debug(  # the event says it; a line at info for each would let a sandbox flood logs
            "egress of %s to %s:%s (%s) refused: %s",
            sandbox.id,
            destination,
            port,
            protocol,
            denial.rule,
        )
        self.denials.setdefault(sandbox.id, collections.deque(maxlen=DENIALS_KEPT)).append(event)
        if self.settings.on_denied is not None:
            self.settings.on_denied(sandbox.id, event)

    def forget(self, sandbox_id: str) -> None:
        self.sandboxes.pop(sandbox_id, None)
        self.denials.pop(sandbox_id, None)


def _logged(reading: asyncio.Future[None]) -> None:
    if not reading.cancelled() and reading.exception() is not None:
        log.warning("could not read the host's addresses: %s", reading.exception())
