"""Engines that share one machine: the names and number ranges each may use on the host.

An engine alone on its machine (the default) uses all of them: the cgroup ``corral``, the
nftables table ``inet corral``, the interfaces ``crx…``, every uid range and every internet
address. Engines that share a machine, as the nodes of a local cluster do, are each given a
scope, 0 to 15. A scope has its own names (the cgroup ``corral-3``, the table
``inet corral_3``, interfaces ``cr3…``) and its own sixteenth of each range, so no engine plans,
filters, counts or cleans up what belongs to another engine's sandboxes.

An engine alone and scoped engines must not run on the same machine: the engine alone uses
every range. `PREFIXES` lists how every Corral engine's interfaces begin, whatever its scope.
"""

from __future__ import annotations

from dataclasses import dataclass

SCOPES = 16
PREFIXES = ("crx", *(f"cr{index:x}" for index in range(SCOPES)))


@dataclass(frozen=True)
class HostScope:
    """Which share of the host one engine uses (`index` None: all of it)."""

    index: int | None = None

    def __post_init__(self) -> None:
        if self.index is not None and not 0 <= self.index < SCOPES:
            raise ValueError(f"a host scope is 0 to {SCOPES - 1}, not {self.index}")

    @property
    def cgroup_parent(self) -> str:
        """The cgroup the engine's sandboxes' cgroups are made in."""
        return "corral" if self.index is None else f"corral-{self.index}"

    @property
    def table(self) -> str:
        """The name of the engine's nftables table (family ``inet``)."""
        return "corral" if self.index is None else f"corral_{self.index}"

    @property
    def iface_prefix(self) -> str:
        """How the host ends of the engine's sandboxes' veths begin; no scope's prefix begins
        with another's (``crx`` alone, ``cr0`` to ``crf`` in scopes)."""
        return "crx" if self.index is None else f"cr{self.index:x}"

    def iface(self, slot: int) -> str:
        """The host end of the veth of the sandbox in address slot `slot`."""
        return f"{self.iface_prefix}{slot:x}"

    def share(self, total: int) -> range:
        """The engine's part of a range of `total` numbers (uid ranges, address slots)."""
        if self.index is None:
            return range(total)
        size = total // SCOPES
        return range(self.index * size, (self.index + 1) * size)
