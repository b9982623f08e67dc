"""Node admission: a new sandbox starts only if the node can hold it, by what every live one
asks for (CPU, memory, disk) against the machine times the operator's overcommit ratios.

Every sandbox counts, whatever started it: a tenant's, a fork's copies, an image build's step,
a filesystem export's copy, a warm pool's. Hibernated sandboxes hold disk but no CPU or memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from corral.core.errors import InvalidRequest, LimitReached
from corral.core.spec import SandboxSpec
from corral.core.state import SandboxState
from corral.engine import Engine

RETRY_AFTER = 5


@dataclass(frozen=True)
class Demand:
    cpu: float = 0.0
    memory_mb: int = 0
    disk_mb: int = 0

    @classmethod
    def of(cls, spec: SandboxSpec, count: int = 1) -> Demand:
        return cls(spec.cpu * count, spec.memory_mb * count, spec.disk_mb * count)

    def __add__(self, other: Demand) -> Demand:
        return Demand(
            self.cpu + other.cpu,
            self.memory_mb + other.memory_mb,
            self.disk_mb + other.disk_mb,
        )

    def __sub__(self, other: Demand) -> Demand:
        return Demand(
            self.cpu - other.cpu,
            self.memory_mb - other.memory_mb,
            self.disk_mb - other.disk_mb,
        )

    def over(self, capacity: Demand) -> str | None:
        """What of `capacity` this demand exceeds, in words; None if it fits."""
        for name, unit, mine, room in (
            ("CPU", "", self.cpu, capacity.cpu),
            ("memory", " MiB", self.memory_mb, capacity.memory_mb),
            ("disk", " MiB", self.disk_mb, capacity.disk_mb),
        ):
            if mine > room:
                return f"{name} ({mine:g}{unit} asked, {room:g}{unit} on this node)"
        return None


def machine_capacity(data_dir: Path, cpu: float, memory: float, disk: float) -> Demand:
    """What the node holds: its CPUs, memory and data disk, each times its overcommit ratio."""
    pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    found = next(path for path in (data_dir, *data_dir.parents) if path.exists())
    fs = os.statvfs(found)
    return Demand(
        (os.cpu_count() or 1) * cpu,
        int(pages * page / 2**20 * memory),
        int(fs.f_blocks * fs.f_frsize / 2**20 * disk),
    )


class Admission:
    """What the node's sandboxes ask for, and the starts in flight, against its capacity."""

    def __init__(self, engine: Engine, capacity: Demand) -> None:
        self._engine = engine
        self.capacity = capacity
        self._pending = Demand()

    def in_use(self) -> Demand:
        """What live sandboxes ask for now: running and paused ones all they ask for,
        hibernated ones their disk; those still being created are counted by `reserve`."""
        total = Demand()
        for record in self._engine.registry.live():
            if record.state is SandboxState.CREATING:
                continue
            demand = Demand.of(record.spec)
            if record.state is SandboxState.HIBERNATED:
                demand = Demand(disk_mb=demand.disk_mb)
            total += demand
        return total

    def check(self, spec: SandboxSpec, count: int = 1) -> Demand:
        """Refuse `count` sandboxes like `spec` if the node cannot hold them: 400 if it could
        never hold one, 429 `node_full` (Retry-After) if not now; what they ask for."""
        alone = Demand.of(spec).over(self.capacity)
        if alone is not None:
            raise InvalidRequest(
                f"this node can never hold a sandbox this large: {alone}; ask for less",
                code="too_large_for_node",
            )
        wanted = Demand.of(spec, count)
        short = (self.in_use() + self._pending + wanted).over(self.capacity)
        if short is not None:
            raise LimitReached(
                f"this node is full: its sandboxes already ask for nearly all its {short}; "
                "retry shortly, or end some sandboxes",
                code="node_full",
                retry_after=RETRY_AFTER,
            )
        return wanted

    def reserve(self, spec: SandboxSpec, count: int = 1) -> Callable[[], None]:
        """`check`, then count them as starting until what it returns is called (once they
        run, or have failed)."""
        wanted = self.check(spec, count)
        self._pending += wanted
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._pending -= wanted

        return release
