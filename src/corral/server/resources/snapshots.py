"""Memory snapshots for one tenant: take, list, look up and delete them; and, for a cluster's
front (admin keys), copied from one node to another as archives with a digest."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from pathlib import Path

from corral.core.errors import Conflict
from corral.core.models import SnapshotInfo
from corral.core.names import check_image_name
from corral.core.quota import Quota
from corral.server.resources.archives import Archives
from corral.server.tenancy import Tenant


class Snapshots:
    """The snapshots of one tenant."""

    def __init__(self, tenant: Tenant) -> None:
        self._tenant = tenant
        self._engine = tenant.service.engine

    async def take(self, sandbox_id: str, name: str | None, ttl: float | None) -> SnapshotInfo:
        """Save one of the tenant's sandboxes, memory and files; it goes on running."""
        sandbox_id = await self._tenant.sandbox(sandbox_id)
        if name is not None:
            check_image_name(name)
            if any(s.name == name for s in self._tenant.snapshots()):
                raise Conflict(
                    f"you have a snapshot named {name!r} already; delete it or pick another name",
                    code="name_taken",
                )
        # A snapshot's size is known once it is taken: refused if the quota is already full.
        await self._tenant.service.check_quota(self._tenant.id, Quota(snapshot_bytes=1))
        return await self._engine.snapshot(sandbox_id, ttl=ttl, name=name, owner=self._tenant.id)

    def list(self) -> list[SnapshotInfo]:
        return self._tenant.snapshots()

    def get(self, ref: str) -> SnapshotInfo:
        return self._tenant.snapshot(ref)

    async def delete(self, ref: str) -> None:
        await self._engine.delete_snapshot(self._tenant.snapshot(ref).id)


class SnapshotArchives(Archives):
    """Snapshots packed and installed whole, to move them between nodes (the front's key)."""

    def __init__(self, tenant: Tenant) -> None:
        super().__init__(tenant)
        self._store = tenant.service.engine.snapshots

    async def pack(self, snapshot_id: str) -> tuple[Path, str, str]:
        """Snapshot `snapshot_id` as an archive (the caller deletes it), its SHA-256, and the
        image its sandboxes start from."""
        image = self._store.get(snapshot_id).info.image
        archive, digest = await self._packed(functools.partial(self._store.pack, snapshot_id))
        return archive, digest, image

    async def install(
        self, snapshot_id: str, chunks: AsyncIterator[bytes], digest: str | None
    ) -> SnapshotInfo:
        """Install snapshot `snapshot_id` from the archive in `chunks`, if it is `digest`."""
        install = functools.partial(self._store.install, snapshot_id)
        return (await self._received(chunks, digest, install)).info
