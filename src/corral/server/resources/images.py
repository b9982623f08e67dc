"""Images for one tenant: build from recipes, snapshot sandboxes' files, list, describe,
remove; the uploads builds need; and, for a cluster's front, images copied between nodes."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterable, AsyncIterator, Callable
from pathlib import Path
from typing import Any

from corral.core.errors import ImageNotFound, LimitReached
from corral.core.names import check_image_name
from corral.core.quota import Quota
from corral.core.recipe import check_recipe
from corral.core.spec import SandboxSpec
from corral.images import transfer
from corral.images.builder import BUILD_SPEC, BuildProgress
from corral.images.lanes import IMAGES
from corral.images.layers import Manifest
from corral.server.resources.archives import Archives
from corral.server.store import ImageEntry
from corral.server.tenancy import Tenant

MiB = 1 << 20


class Images:
    """The images of one tenant, and the node's image storage as a tenant may use it."""

    def __init__(self, tenant: Tenant) -> None:
        self._tenant = tenant
        self._service = tenant.service
        self._layers = tenant.service.engine.images.built

    async def check(self, recipe: Any, name: str | None) -> None:
        """Refuse, before anything starts, a recipe this key may not build: malformed, on
        an image it may not use, or naming content it has not uploaded."""
        if name is not None:
            check_image_name(name)
        base, steps = check_recipe(recipe)
        if self._service.engine.images.is_builtin(base["kind"]):
            self._tenant.builtin(base["kind"])
        await self._tenant.blobs(step["blob"] for step in (base, *steps) if "blob" in step)
        quota = self._service.config.max_image_bytes_per_key
        used = sum(image["size_bytes"] for image in await self.list())
        if used >= quota:
            raise LimitReached(
                f"your images take {used / MiB:,.0f} MiB, and this server allows each key "
                f"{quota / MiB:,.0f} MiB: remove some (corral image rm NAME) and build again",
                code="image_quota_exceeded",
            )

    def start_build(self) -> Callable[[], None]:
        """Count a build of this key's in flight (429 past its limit), and as one of its
        sandboxes (a build runs one at a time) if the node has room; call what it returns once
        the build has finished."""
        in_flight, key_id = self._service.in_flight, self._tenant.id
        in_flight.enter(key_id, "build")
        try:
            admitted = self._service.admit(key_id, 1, BUILD_SPEC, reserve=False)
        except BaseException:
            in_flight.leave(key_id, "build")
            raise

        def finished() -> None:
            admitted()
            in_flight.leave(key_id, "build")

        return finished

    async def build(self, recipe: Any, name: str | None, progress: BuildProgress) -> dict[str, Any]:
        """Build `recipe` (see `corral.images.builder`, checked by `check`) as an image of
        the tenant's."""
        # Scoped to the key: no cached layer of another key's build is used, or shown as such.
        manifest = await self._service.builder.build(recipe, progress, scope=self._tenant.id)
        entry = await self._service.store.add_image(self._tenant.id, manifest.id, name)
        return _describe(entry, manifest)

    async def snapshot_filesystem(self, sandbox_id: str, name: str | None) -> dict[str, Any]:
        """The sandbox's files as a new image of the tenant's."""
        sandbox_id = await self._tenant.sandbox(sandbox_id)
        if name is not None:
            check_image_name(name)
        # A gVisor sandbox's files are exported from a copy of it: one more sandbox.
        async with self._service.admitting(self._tenant.id, 1, self._engine_spec(sandbox_id)):
            manifest = await self._service.builder.snapshot_filesystem(sandbox_id)
        entry = await self._service.store.add_image(self._tenant.id, manifest.id, name)
        return _describe(entry, manifest)

    def _engine_spec(self, sandbox_id: str) -> SandboxSpec:
        return self._service.engine.get(sandbox_id).spec

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
        freed = await IMAGES.run(self._layers.prune, keep, engine.layers_in_use())
        return {**freed, **await IMAGES.run(self._layers.usage)}

    async def usage(self) -> dict[str, int]:
        return await IMAGES.run(self._layers.usage)

    async def add_blob(self, digest: str, chunks: AsyncIterable[bytes]) -> int:
        """Store content a recipe names by digest (checked: sending it proves holding it);
        its size."""
        limit = self._service.config.max_blob_bytes
        # Its size is known once it is sent: refused if the quota is already full.
        await self._service.check_quota(self._tenant.id, Quota(blob_bytes=1))
        with self._tenant.hold("upload"):
            size = await self._layers.add_blob(digest, chunks, limit)
        await self._service.store.blobs.add(self._tenant.id, digest, size)
        return size

    async def has_blob(self, digest: str) -> bool:
        """Whether this key sent the content `digest` and the node still holds it."""
        mine = digest in await self._service.store.blobs.of(self._tenant.id, [digest])
        return mine and self._layers.has_blob(digest)


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


class ImageArchives(Archives):
    """Built images packed and installed whole, for a cluster's nodes on other machines
    (the front's key; `corral.images.transfer`)."""

    def __init__(self, tenant: Tenant) -> None:
        super().__init__(tenant)
        self._images = tenant.service.engine.images

    def has(self, image_id: str) -> None:
        """Nothing if built image `image_id` is here whole, else ImageNotFound."""
        if not transfer.can_run(self._images.built, image_id):
            raise ImageNotFound(f"no built image {image_id!r} on this node")

    async def pack(self, image_id: str) -> tuple[Path, str]:
        """Image `image_id` as an archive (the caller deletes it) and its SHA-256."""
        self.has(image_id)
        return await self._packed(functools.partial(transfer.pack, self._images.built, image_id))

    async def install(
        self, image_id: str, chunks: AsyncIterator[bytes], digest: str | None
    ) -> dict[str, Any]:
        """Install image `image_id` from the archive in `chunks`, if it is `digest`."""
        bases = set(self._images.names)
        install = functools.partial(transfer.install, self._images.built, image_id, base_ok=bases)
        manifest = await self._received(chunks, digest, install)
        return {"id": manifest.id, "layers": list(manifest.layers)}
