"""Images for one tenant: build from recipes, snapshot sandboxes' files, list, describe,
remove; and the uploads builds need."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable
from typing import Any

from corral.core.errors import ImageNotFound
from corral.core.names import check_image_name
from corral.images.builder import BuildProgress
from corral.images.layers import Manifest
from corral.server.store import ImageEntry
from corral.server.tenancy import Tenant


class Images:
    """The images of one tenant, and the node's image storage as a tenant may use it."""

    def __init__(self, tenant: Tenant) -> None:
        self._tenant = tenant
        self._service = tenant.service
        self._layers = tenant.service.engine.images.built

    async def build(self, recipe: Any, name: str | None, progress: BuildProgress) -> dict[str, Any]:
        """Build `recipe` (see `corral.images.builder`) as an image of the tenant's."""
        if name is not None:
            check_image_name(name)
        manifest = await self._service.builder.build(recipe, progress)
        entry = await self._service.store.add_image(self._tenant.id, manifest.id, name)
        return _describe(entry, manifest)

    async def snapshot_filesystem(self, sandbox_id: str, name: str | None) -> dict[str, Any]:
        """The sandbox's files as a new image of the tenant's."""
        sandbox_id = await self._tenant.sandbox(sandbox_id)
        if name is not None:
            check_image_name(name)
        manifest = await self._service.builder.snapshot_filesystem(sandbox_id)
        entry = await self._service.store.add_image(self._tenant.id, manifest.id, name)
        return _describe(entry, manifest)

    async def list(self) -> list[dict[str, Any]]:
        found = []
        for entry in await self._service.store.list_images(self._tenant.id):
            manifest = self._layers.manifest(entry.id)
            if manifest is not None:
                found.append(_describe(entry, manifest))
        return found

    async def describe(self, ref: str) -> dict[str, Any]:
        entry = await self._tenant.image_entry(ref)
        manifest = self._layers.manifest(entry.id)
        if manifest is None:
            raise ImageNotFound(f"you have no image {ref!r} (corral image list shows yours)")
        return _describe(entry, manifest)

    async def remove(self, ref: str) -> None:
        """Forget the image; its layers go at the next prune if no other image uses them."""
        entry = await self._tenant.image_entry(ref)
        await self._service.store.remove_image(self._tenant.id, entry.id)

    async def prune(self) -> dict[str, Any]:
        """Remove the layers and blobs no key's image and no live sandbox uses (an admin's)."""
        engine = self._service.engine
        keep = await self._service.store.image_ids()
        keep |= {s.image for s in engine.list_snapshots()}  # their sandboxes need it
        freed = await asyncio.to_thread(self._layers.prune, keep, engine.layers_in_use())
        return {**freed, **await asyncio.to_thread(self._layers.usage)}

    async def usage(self) -> dict[str, int]:
        return await asyncio.to_thread(self._layers.usage)

    async def add_blob(self, digest: str, chunks: AsyncIterable[bytes]) -> int:
        """Store content a recipe names by digest; its size."""
        return await self._layers.add_blob(digest, chunks, self._service.config.max_blob_bytes)

    def has_blob(self, digest: str) -> bool:
        return self._layers.has_blob(digest)


def _describe(entry: ImageEntry, manifest: Manifest) -> dict[str, Any]:
    return {
        "id": manifest.id,
        "name": entry.name,
        "created_at": entry.created_at,
        "size_bytes": manifest.size_bytes,
        "layers": len(manifest.layers),
        "steps": list(manifest.steps),
        "env": sorted(manifest.env),
        "workdir": manifest.workdir,
    }
