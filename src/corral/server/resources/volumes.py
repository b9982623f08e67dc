"""Persistent volumes for one tenant: make, describe, list and delete them."""

from __future__ import annotations

import contextlib
from typing import Any

from corral.core.errors import Conflict, LimitReached, VolumeNotFound
from corral.core.models import VolumeInfo
from corral.core.names import check_volume_name
from corral.core.quota import Quota
from corral.core.spec import check_volume_size
from corral.server.store import VolumeEntry
from corral.server.tenancy import Tenant


class Volumes:
    """The volumes of one tenant."""

    def __init__(self, tenant: Tenant) -> None:
        self._tenant = tenant
        self._service = tenant.service
        self._engine = tenant.service.engine

    async def create(self, name: str, size_mb: int) -> dict[str, Any]:
        """An empty volume; `Conflict` (volume_exists) if the tenant has one by that name."""
        check_volume_name(name)
        check_volume_size(size_mb)
        store, owner = self._service.store, self._tenant.id
        if await store.find_volume(owner, name) is not None:
            raise Conflict(f"you already have a volume named {name!r}", code="volume_exists")
        await self._service.check_quota(owner, Quota(volume_mb=size_mb))
        most = self._service.config.max_volumes_per_key
        if len(await store.list_volumes(owner)) >= most:
            raise LimitReached(
                f"this API key has {most} volumes, the most allowed; delete some first",
                code="too_many_volumes",
            )
        # The disk first, then the row: a crash in between leaves a disk nobody sees (space
        # only for its empty filesystem), never a volume whose data is missing.
        made = await self._engine.create_volume(size_mb)
        entry = VolumeEntry(made.id, name, made.size_mb, made.created_at)
        try:
            await store.add_volume(owner, entry)
        except BaseException:
            await self._engine.delete_volume(made.id)  # e.g. the same name made concurrently
            raise
        return _describe(entry, made)

    async def describe(self, ref: str) -> dict[str, Any]:
        entry = await self._tenant.volume(ref)
        return _describe(entry, await self._engine.volume(entry.id))

    async def list(self) -> list[dict[str, Any]]:
        found = []
        for entry in await self._service.store.list_volumes(self._tenant.id):
            try:
                info = await self._engine.volume(entry.id)
            except VolumeNotFound:  # its disk is gone (deleted by hand): listed, empty
                info = VolumeInfo(entry.id, entry.size_mb, entry.created_at, 0)
            found.append(_describe(entry, info))
        return found

    async def delete(self, ref: str) -> None:
        """Delete the volume and its data; `VolumeInUse` while sandboxes mount it."""
        entry = await self._tenant.volume(ref)
        with contextlib.suppress(VolumeNotFound):  # its disk is gone already: forget it
            await self._engine.delete_volume(entry.id)
        await self._service.store.remove_volume(self._tenant.id, entry.id)


def _describe(entry: VolumeEntry, info: VolumeInfo) -> dict[str, Any]:
    return {
        "id": entry.id,
        "name": entry.name,
        "size_mb": entry.size_mb,
        "created_at": entry.created_at,
        "used_bytes": info.used_bytes,
        "sandboxes": list(info.sandboxes),
    }
