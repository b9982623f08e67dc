"""Sandboxes moving between a cluster's nodes, keeping their ids (the front's key only): the
node a sandbox leaves hands it off, the node it goes to takes it in, and the leaving node then
forgets it or keeps it (see `corral.engine.moving`)."""

from __future__ import annotations

from corral.core.errors import InvalidState
from corral.core.models import SandboxInfo, SnapshotInfo
from corral.core.state import SandboxState
from corral.server.tenancy import Tenant


class SandboxMoves:
    """One node's side of moves: out (`hand_off`, `stay`, `gone`) and in (`take_in`)."""

    def __init__(self, tenant: Tenant) -> None:
        self._service = tenant.service
        self._moving = tenant.service.engine.moving

    async def hand_off(
        self, sandbox_id: str, to: str
    ) -> tuple[SnapshotInfo, SandboxState, SandboxInfo]:
        """Hibernate the sandbox for node `to`: its checkpoint as a snapshot, the state it
        was in, and the sandbox now. Its hibernation is in the store when this returns, for
        the other node to read."""
        taken, before = await self._moving.hand_off(sandbox_id, to)
        await self._service.recorded()
        return taken, before.state, self._service.engine.get(sandbox_id)

    async def stay(self, sandbox_id: str) -> SandboxInfo:
        return await self._moving.stay(sandbox_id)

    async def gone(self, sandbox_id: str) -> None:
        await self._moving.gone(sandbox_id)
        self._service.moved_away(sandbox_id)

    async def take_in(
        self, sandbox_id: str, snapshot_id: str, remaining: float | None, *, wake: bool
    ) -> SandboxInfo:
        """The sandbox that node handed off, here now (woken, if `wake`); its owner and story
        from the store."""
        found = await self._service.store.get_sandbox(sandbox_id)
        if found is None or found[1].state is not SandboxState.HIBERNATED:
            raise InvalidState(
                f"sandbox {sandbox_id} is not recorded as hibernated: hand it off first",
                code="not_handed_off",
            )
        owner, known = found
        info = await self._moving.take_in(
            sandbox_id,
            snapshot_id,
            created_at=known.created_at,
            history=known.history,
            remaining=remaining,
        )
        await self._service.moved_in(owner, info)
        return await self._service.engine.wake(sandbox_id) if wake else info
