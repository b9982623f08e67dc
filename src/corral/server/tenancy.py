"""Tenancy: the one place that decides what an API key may see and touch.

Every id or name a request sends (a sandbox's id; an image's, volume's or snapshot's id or name;
the image and volumes a new sandbox asks for) passes through `Tenant` on its way in and comes
out as something that key owns. Another key's resource is "not found", worded exactly as one
that never existed, so ids cannot be probed. The resource services (`corral.server.resources`)
take only what a `Tenant` hands them; routes take only resource services.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable

from corral.core.errors import (
    ImageNotFound,
    NotFound,
    PermissionDenied,
    SandboxNotFound,
    VolumeNotFound,
)
from corral.core.ids import check_id
from corral.core.models import SnapshotInfo
from corral.core.spec import SandboxSpec
from corral.server.service import Service
from corral.server.store import ApiKey, ImageEntry, VolumeEntry


class Tenant:
    """One API key's view of the node."""

    def __init__(self, service: Service, key: ApiKey) -> None:
        self.service = service
        self.key = key

    @property
    def id(self) -> str:
        return self.key.id

    def hold(self, kind: str) -> contextlib.AbstractContextManager[None]:
        """One of this key's calls of `kind` in flight (see `InFlight`): 429 past its limit."""
        return self.service.in_flight.hold(self.key.id, kind)

    async def sandbox(self, sandbox_id: str) -> str:
        """`sandbox_id`, if this key owns it (ended ones for 7 days)."""
        check_id(sandbox_id, "sb")
        if await self.service.owner_of(sandbox_id) != self.key.id:
            raise SandboxNotFound(
                f"no sandbox {sandbox_id} (it never existed, ended more than 7 days ago, "
                "or belongs to another API key)"
            )
        return sandbox_id

    async def image(self, ref: str) -> str:
        """What the engine calls image `ref`: a built-in name, or the id of this key's image
        whose id or name is `ref`."""
        if self.service.engine.images.is_builtin(ref):
            self.builtin(ref)
            return ref
        entry = await self.service.store.find_image(self.key.id, ref)
        if entry is None:
            raise ImageNotFound(
                f"no image {ref!r}: use debian, host, or the id or name of an image you built "
                "(corral image list)"
            )
        return entry.id

    def builtin(self, name: str) -> None:
        """Refuse the built-in image `name` if this key may not use it: `host` (this
        machine's own files) is for admin keys unless the operator opened it to all."""
        if name == "host" and not (self.key.admin or self.service.config.open_host_image):
            raise PermissionDenied(
                "the host image (this machine's own files) is for admin keys; use debian, or "
                "ask the operator to open it to every key (corral serve --open-host-image)",
                code="host_image_refused",
            )

    async def blobs(self, digests: Iterable[str]) -> None:
        """Refuse unless this key uploaded every one of `digests` (content is stored once
        per node, but only a key that sent it, and so holds it, may use it)."""
        wanted = set(digests)
        missing = wanted - await self.service.store.blobs.of(self.key.id, wanted)
        if missing:
            raise NotFound(
                f"no blob {min(missing)}: upload it first (PUT /v1/blobs/{{digest}}; the SDK "
                "uploads local files itself)",
                code="blob_not_found",
            )

    async def image_entry(self, ref: str) -> ImageEntry:
        """This key's built image whose id or name is `ref`."""
        entry = await self.service.store.find_image(self.key.id, ref)
        if entry is None:
            raise ImageNotFound(f"you have no image {ref!r} (corral image list shows yours)")
        return entry

    async def volume(self, ref: str) -> VolumeEntry:
        """This key's volume whose id or name is `ref`."""
        entry = await self.service.store.find_volume(self.key.id, ref)
        if entry is None:
            raise VolumeNotFound(
                f"no volume {ref!r}: give the name or id of a volume you made "
                "(corral volume list shows yours)"
            )
        return entry

    def snapshots(self) -> list[SnapshotInfo]:
        """This key's snapshots, oldest first."""
        return [s for s in self.service.engine.list_snapshots() if s.owner == self.key.id]

    def snapshot(self, ref: str) -> SnapshotInfo:
        """This key's snapshot whose id or name is `ref`."""
        for snapshot in self.snapshots():
            if ref in (snapshot.id, snapshot.name):
                return snapshot
        raise NotFound(
            f"you have no snapshot {ref!r} (deleted, expired, or never taken)",
            code="snapshot_not_found",
        )

    async def spec(self, spec: SandboxSpec, *, image: bool = True) -> SandboxSpec:
        """`spec` with the names and ids of this key's volumes (and image, unless `image` is
        false) resolved to engine ids: the engine takes ids only, and sees none of another
        key's."""
        volumes = tuple(
            [
                dataclasses.replace(mount, volume=(await self.volume(mount.volume)).id)
                for mount in spec.volumes
            ]
        )
        resolved = await self.image(spec.image) if image else spec.image
        return dataclasses.replace(spec, volumes=volumes, image=resolved)
