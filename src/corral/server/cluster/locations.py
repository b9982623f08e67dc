"""Where a front last saw each sandbox: a hint that saves a store read per request, not the
truth.

A sandbox can change node without this front hearing of it: moved through another front, or
by another front's drain. Its old node then refuses requests about it, naming the node that
runs it now (421, `corral.server.cluster.elsewhere`), and the front sends them there and
remembers that node instead. The hint is bounded: a long-lived front makes sandboxes
without end, and an ended one is never asked about again, so the least recently used are
forgotten past `LIMIT` (a forgotten one costs a store read at its next use, nothing else).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from corral.server.store import Store

LIMIT = 65_536


class Locations:
    """Sandbox id -> the name of the node last seen running it, least recently used first."""

    def __init__(self, limit: int = LIMIT) -> None:
        self._limit = limit
        self._nodes: OrderedDict[str, str] = OrderedDict()

    def get(self, sandbox_id: str) -> str | None:
        node = self._nodes.get(sandbox_id)
        if node is not None:
            self._nodes.move_to_end(sandbox_id)
        return node

    def __setitem__(self, sandbox_id: str, node: str) -> None:
        self._nodes[sandbox_id] = node
        self._nodes.move_to_end(sandbox_id)
        while len(self._nodes) > self._limit:
            self._nodes.popitem(last=False)

    async def lookup(self, store: Store, sandbox_id: str, *, fresh: bool = False) -> str | None:
        """The node of `sandbox_id`: remembered (unless `fresh`), else the store's word, then
        remembered."""
        name = None if fresh else self.get(sandbox_id)
        if name is None and sandbox_id.startswith("sb-"):
            self.forget(sandbox_id)
            found = await store.get_sandbox(sandbox_id)
            name = found[1].node if found else None
            if name is not None:
                self[sandbox_id] = name
        return name

    def forget(self, sandbox_id: str) -> None:
        self._nodes.pop(sandbox_id, None)

    def __len__(self) -> int:
        return len(self._nodes)
