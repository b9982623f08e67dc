"""The engine's sandboxes by id, live and recently ended, and who hears of their changes."""

from __future__ import annotations

import builtins
import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from corral.core.egress import EgressPolicy
from corral.core.errors import SandboxNotFound
from corral.core.ids import check_id
from corral.core.models import SandboxInfo
from corral.core.state import SandboxState, parse_state
from corral.engine.record import SandboxRecord

log = logging.getLogger("corral.engine")

ENDED_KEPT = 1000  # terminated sandboxes remembered for `get` and `list`


class Registry:
    """Every sandbox the engine knows, in creation order.

    `on_change` is told each public state change of a sandbox (pooled ones excepted); what it
    raises is logged, never propagated.
    """

    def __init__(
        self, on_change: Callable[[SandboxInfo], None] | None = None, node: str | None = None
    ) -> None:
        self._records: dict[str, SandboxRecord] = {}
        self._on_change = on_change
        self.node = node  # named in every sandbox's info

    def add(self, record: SandboxRecord) -> None:
        record.on_change = self._notify
        record.node = self.node
        self._records[record.id] = record

    def discard(self, sandbox_id: str) -> None:
        self._records.pop(sandbox_id, None)

    def find(self, sandbox_id: str) -> SandboxRecord | None:
        """The record of `sandbox_id`, pooled ones included; None if unknown."""
        return self._records.get(sandbox_id)

    def get(self, sandbox_id: str) -> SandboxRecord:
        """The sandbox `sandbox_id` as its user sees it: `SandboxNotFound` for an unknown or
        pooled one (idle pooled sandboxes are nobody's to see)."""
        check_id(sandbox_id, "sb")
        record = self._records.get(sandbox_id)
        if record is None or record.pooled:
            raise SandboxNotFound(f"no sandbox {sandbox_id}")
        return record

    def __iter__(self) -> Iterator[SandboxRecord]:
        return iter(list(self._records.values()))

    def live(self) -> builtins.list[SandboxRecord]:
        return [record for record in self._records.values() if record.alive]

    def internet_at(self, slot: int) -> tuple[str, EgressPolicy | None] | None:
        """The live internet sandbox in address slot `slot` (its id and rules), if any."""
        for record in self._records.values():
            network = record.plan.network
            if record.alive and network.policy == "internet" and network.index == slot:
                return record.id, record.spec.egress
        return None

    def list(
        self, *, state: SandboxState | str | None = None, metadata: Mapping[str, str] | None = None
    ) -> builtins.list[SandboxInfo]:
        """Sandboxes in creation order, optionally only those in `state` whose metadata match."""
        wanted = parse_state(state) if state is not None else None
        found = []
        for record in self._records.values():
            if record.pooled or (wanted is not None and record.state is not wanted):
                continue
            if metadata and any(record.spec.metadata.get(k) != v for k, v in metadata.items()):
                continue
            found.append(record.info())
        return found

    def forget_old(self) -> None:
        """Keep only the last `ENDED_KEPT` ended sandboxes."""
        ended = [record for record in self._records.values() if not record.alive]
        for record in ended[:-ENDED_KEPT]:
            del self._records[record.id]

    def volume_users(self, volume_id: str) -> builtins.list[str]:
        """Live sandboxes (being created included) that mount `volume_id`."""
        return [
            record.id
            for record in self.live()
            if any(v.volume_id == volume_id for v in record.plan.volumes)
        ]

    def layers_in_use(self, layers_dir: Path) -> set[str]:
        """Keys of the layers under `layers_dir` that live sandboxes stack."""
        return {
            Path(layer).name
            for record in self.live()
            for layer in record.plan.layers
            if Path(layer).parent == layers_dir
        }

    def _notify(self, record: SandboxRecord) -> None:
        if self._on_change is None or record.pooled:
            return
        try:
            self._on_change(record.info())
        except Exception:
            log.exception("the on_change callback failed for sandbox %s", record.id)
