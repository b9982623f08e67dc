"""Persistent volumes as the SDK sees them: `AsyncVolume` (the sync `Volume` wraps it)."""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from corral.client._client import AsyncClient, default_client
from corral.errors import Conflict, VolumeNotFound


@dataclass(frozen=True)
class AsyncVolume:
    """A named persistent volume on the server: files that outlive sandboxes and restarts.

    Give it to `AsyncSandbox.create(volumes={"/data": volume})`; every sandbox that mounts it
    sees the same files, at once. `read_only()` is a handle that mounts it read-only. Its
    `size_mb` is its quota: writing past it fails with "No space left on device" inside.

    Example:
        >>> work = await AsyncVolume.from_name("work", create_if_missing=True)
        >>> async with await AsyncSandbox.create(volumes={"/work": work}) as sandbox:
        ...     await sandbox.run("echo kept > /work/notes.txt")
    """

    id: str
    name: str
    size_mb: int
    created_at: float
    used_bytes: int = 0  # as of when fetched; `refresh()` fetches again
    sandboxes: tuple[str, ...] = ()  # your live sandboxes mounting it, as of when fetched
    is_read_only: bool = False  # this handle mounts the volume read-only
    client: AsyncClient | None = field(default=None, repr=False, compare=False)

    @classmethod
    def _from_dict(cls, data: Mapping[str, Any], client: AsyncClient) -> AsyncVolume:
        return cls(
            id=data["id"],
            name=data["name"],
            size_mb=data["size_mb"],
            created_at=data["created_at"],
            used_bytes=data.get("used_bytes", 0),
            sandboxes=tuple(data.get("sandboxes", ())),
            client=client,
        )

    @classmethod
    async def create(
        cls, name: str, *, size_mb: int = 1024, client: AsyncClient | None = None
    ) -> AsyncVolume:
        """Make an empty volume named `name` (unique among your volumes) of `size_mb` MiB.

        Raises `Conflict` (code `volume_exists`) if you already have one by that name.
        """
        client = client or default_client()
        body = {"name": name, "size_mb": size_mb}
        return cls._from_dict(await client.request("POST", "/v1/volumes", json=body), client)

    @classmethod
    async def from_name(
        cls,
        name: str,
        *,
        create_if_missing: bool = False,
        size_mb: int = 1024,
        client: AsyncClient | None = None,
    ) -> AsyncVolume:
        """Your volume called `name` (or with that id); made with `size_mb` if missing and
        `create_if_missing`, else `VolumeNotFound`."""
        client = client or default_client()
        try:
            return cls._from_dict(await client.request("GET", f"/v1/volumes/{name}"), client)
        except VolumeNotFound:
            if not create_if_missing:
                raise
        try:
            return await cls.create(name, size_mb=size_mb, client=client)
        except Conflict as exc:  # made meanwhile by someone else with this key
            if exc.code != "volume_exists":
                raise
            return cls._from_dict(await client.request("GET", f"/v1/volumes/{name}"), client)

    @classmethod
    async def list(cls, *, client: AsyncClient | None = None) -> builtins.list[AsyncVolume]:
        """Your volumes, oldest first."""
        client = client or default_client()
        return [cls._from_dict(v, client) for v in await client.request("GET", "/v1/volumes")]

    async def refresh(self) -> AsyncVolume:
        """The volume as it is now (usage, sandboxes mounting it); this handle's mode kept."""
        data = await self._client.request("GET", f"/v1/volumes/{self.id}")
        return replace(self._from_dict(data, self._client), is_read_only=self.is_read_only)

    async def delete(self) -> None:
        """Delete the volume and every file on it. Raises `VolumeInUse` while live sandboxes
        mount it."""
        await self._client.request("DELETE", f"/v1/volumes/{self.id}")

    def read_only(self) -> AsyncVolume:
        """A handle on the same volume that sandboxes mount read-only (writes fail, EROFS)."""
        return replace(self, is_read_only=True)

    @property
    def _client(self) -> AsyncClient:
        return self.client or default_client()


VolumeRef = AsyncVolume | str  # a volume, or the name or id of one of yours


def mounts_body(volumes: Mapping[str, VolumeRef] | None) -> builtins.list[dict[str, Any]]:
    """`{"/data": volume}` as the API's `volumes` list; a string is a name or id, mounted
    read-write."""
    body = []
    for path, volume in (volumes or {}).items():
        if isinstance(volume, AsyncVolume):
            body.append({"path": path, "volume": volume.id, "read_only": volume.is_read_only})
        else:
            body.append({"path": path, "volume": volume, "read_only": False})
    return body
