"""Per-key limits over the whole cluster.

Each node enforces `--max-sandboxes-per-key` and the key's quota (CPU, memory, disk) on its own
sandboxes. Every create passes the front, which checks them against the key's sandboxes on
every node (the shared store) plus the creates it has in flight, and those that a node has
answered but not yet written to the store (it writes a moment after it answers). What a create
asks for is what its body says, a field it leaves out counting at its default; the node that
makes the sandbox still checks its own share exactly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from corral.core.errors import LimitReached
from corral.core.quota import Quota
from corral.core.spec import SandboxSpec
from corral.server.store import ApiKey, Store

RECENT = 30.0  # seconds a made sandbox counts here if the store has not shown it yet


@dataclass
class Pending:
    """A create the front let through: in flight (no id yet), or made and not yet stored."""

    asks: Quota
    sandbox_id: str | None = None
    until: float = field(default_factory=lambda: time.monotonic() + RECENT)


def asked(body: object) -> Quota:
    """What a create's JSON body asks for (defaults for what it leaves out; nothing for what
    is not a number, which the node refuses)."""
    given = body if isinstance(body, dict) else {}
    default = SandboxSpec()
    values = [given.get(name, getattr(default, name)) for name in ("cpu", "memory_mb", "disk_mb")]
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in values):
        return Quota()
    cpu, memory_mb, disk_mb = values
    return Quota(cpu=float(cpu), memory_mb=int(memory_mb), disk_mb=int(disk_mb))


async def bearer_key(store: Store, authorization: str | None) -> ApiKey | None:
    """The live key an `Authorization: Bearer` header gives, or None."""
    scheme, _, secret = (authorization or "").partition(" ")
    return await store.authenticate(secret.strip()) if scheme.lower() == "bearer" else None


class KeyLimits:
    """The front's count of each key's sandboxes across the nodes, and the checks on it."""

    def __init__(self, store: Store, per_key: int) -> None:
        self._store = store
        self._per_key = per_key
        self._pending: dict[str, list[Pending]] = {}  # by key id
        self._lock = asyncio.Lock()  # one check at a time: two creates cannot both pass

    async def reserve(self, authorization: str | None, asks: Quota, count: int) -> list[Pending]:
        """Count `count` sandboxes asking for `asks` each against the key's limits, or refuse
        them (429); `made` or `failed` tells what became of each. Nothing is counted for a
        request without a valid key: the node it goes to refuses it."""
        key = await bearer_key(self._store, authorization)
        if key is None:
            return []
        async with self._lock:
            listed = self._pending.get(key.id, [])
            unstored = [p for p in listed if not await self._stored(p)]
            # Read after the checks above: one stored meanwhile counts twice, never not at all.
            live = await self._store.live_sandboxes(owner=key.id)
            quota = (await self._store.quotas()).get(key.id)
            used = await self._store.usage(key.id) if quota is not None else Quota()
            # No await from here on: what failed meanwhile (`failed` takes no lock) is gone
            # from the current list, and neither counts nor comes back from `listed`.
            current = self._pending.get(key.id, [])
            still = {id(p) for p in current}
            pending = [p for p in unstored if id(p) in still]
            mine = len(live) + len(pending)
            if mine + count > self._per_key:
                raise LimitReached(
                    f"this API key has {mine} live sandboxes across the cluster's nodes and may "
                    f"have {self._per_key}; terminate some and retry",
                    code="too_many_sandboxes",
                    retry_after=5,
                )
            if quota is not None:
                for entry in pending:
                    used = used.plus(entry.asks)
                for _ in range(count):
                    used = used.plus(asks)
                past = quota.exceeded_by(used)
                if past is not None:
                    raise LimitReached(
                        f"this API key's quota does not allow it across the cluster's nodes "
                        f"({past}): end or delete something of yours, or ask an admin for a "
                        "larger quota",
                        code="quota_exceeded",
                        retry_after=60,
                    )
            entries = [Pending(asks) for _ in range(count)]
            # What the store shows now counts there.
            shown = {id(p) for p in listed} - {id(p) for p in unstored}
            self._pending[key.id] = [p for p in current if id(p) not in shown] + entries
        return entries

    async def _stored(self, entry: Pending) -> bool:
        """Whether the store shows what `entry` made (then it counts there), or it is too old
        to count."""
        if entry.sandbox_id is None:
            return False
        return (
            entry.until < time.monotonic() or await self._store.owner(entry.sandbox_id) is not None
        )

    def made(self, entries: Sequence[Pending], sandbox_ids: Sequence[str]) -> None:
        """The creates made these sandboxes: they count until the store shows them."""
        for entry, sandbox_id in zip(entries, sandbox_ids, strict=False):
            entry.sandbox_id, entry.until = sandbox_id, time.monotonic() + RECENT
        self.failed(entries[len(sandbox_ids) :])

    def failed(self, entries: Sequence[Pending]) -> None:
        """The creates made nothing: they no longer count."""
        doomed = {id(entry) for entry in entries}
        for key_id, pending in list(self._pending.items()):
            self._pending[key_id] = [p for p in pending if id(p) not in doomed]
