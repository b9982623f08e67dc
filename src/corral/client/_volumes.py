"""Persistent volumes as the SDK sees them: `AsyncVolume` and its synchronous twin `Volume`."""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from corral.client._client import AsyncClient, default_client
from corral.client._sync import (
    Client,
    Twin,
    async_client,
    blocking,
    blocking_self,
    constructor,
    constructor_each,
)
from corral.core.errors import Conflict, VolumeNotFound


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
        cls, name: str, *, size_mb: int = 1024, client: AsyncClient | Client | None = None
    ) -> AsyncVolume:
        """Make an empty volume named `name` (unique among your volumes) of `size_mb` MiB.

        Raises `Conflict` (code `volume_exists`) if you already have one by that name.
        """
        aio = async_client(client)
        body = {"name": name, "size_mb": size_mb}
        return cls._from_dict(await aio.request("POST", "/v1/volumes", json=body), aio)

    @classmethod
    async def from_name(
        cls,
        name: str,
        *,
        create_if_missing: bool = False,
        size_mb: int = 1024,
        client: AsyncClient | Client | None = None,
    ) -> AsyncVolume:
        """Your volume called `name` (or with that id); made with `size_mb` if missing and
        `create_if_missing`, else `VolumeNotFound`."""
        aio = async_client(client)
        try:
            return cls._from_dict(await aio.request("GET", f"/v1/volumes/{name}"), aio)
        except VolumeNotFound:
            if not create_if_missing:
                raise
        try:
            return await cls.create(name, size_mb=size_mb, client=aio)
        except Conflict as exc:  # made meanwhile by someone else with this key
            if exc.code != "volume_exists":
                raise
            return cls._from_dict(await aio.request("GET", f"/v1/volumes/{name}"), aio)

    @classmethod
    async def list(
        cls, *, client: AsyncClient | Client | None = None
    ) -> builtins.list[AsyncVolume]:
        """Your volumes, oldest first."""
        aio = async_client(client)
        return [cls._from_dict(v, aio) for v in await aio.request("GET", "/v1/volumes")]

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


class Volume(Twin[AsyncVolume]):
    """A persistent volume, for synchronous code (see `AsyncVolume` for details).

    Example:
        >>> data = corral.Volume.from_name("data", create_if_missing=True)
        >>> with corral.Sandbox.create(volumes={"/data": data}) as sandbox:
        ...     sandbox.run("echo kept > /data/notes.txt")
        >>> with corral.Sandbox.create(volumes={"/data": data.read_only()}) as sandbox:
        ...     sandbox.run("cat /data/notes.txt").stdout
        'kept\\n'
    """

    @property
    def id(self) -> str:
        """The volume's id (`vol-…`)."""
        return self._async.id

    @property
    def name(self) -> str:
        """Its name, unique among your volumes."""
        return self._async.name

    @property
    def size_mb(self) -> int:
        """Its size in MiB, which is its quota."""
        return self._async.size_mb

    @property
    def created_at(self) -> float:
        """When it was made (Unix time)."""
        return self._async.created_at

    @property
    def used_bytes(self) -> int:
        """Bytes its files take, as of when fetched (`refresh()` fetches again)."""
        return self._async.used_bytes

    @property
    def sandboxes(self) -> tuple[str, ...]:
        """Your live sandboxes that mount it, as of when fetched."""
        return self._async.sandboxes

    @property
    def is_read_only(self) -> bool:
        """Whether this handle mounts the volume read-only."""
        return self._async.is_read_only

    def __repr__(self) -> str:
        mode = " read-only" if self.is_read_only else ""
        return f"<Volume {self.id} {self.name!r} {self.size_mb} MiB{mode}>"

    create = constructor(AsyncVolume.create)
    from_name = constructor(AsyncVolume.from_name)
    list = constructor_each(AsyncVolume.list)
    refresh = blocking_self(AsyncVolume.refresh)
    delete = blocking(AsyncVolume.delete)

    def read_only(self) -> Volume:
        """A handle on the same volume that sandboxes mount read-only."""
        return Volume(self.client, self._async.read_only())


VolumeRef = AsyncVolume | Volume | str  # a volume, or the name or id of one of yours


def mounts_body(volumes: Mapping[str, VolumeRef] | None) -> builtins.list[dict[str, Any]]:
    """`{"/data": volume}` as the API's `volumes` list; a string is a name or id, mounted
    read-write."""
    body = []
    for path, volume in (volumes or {}).items():
        if isinstance(volume, Volume):
            volume = volume._async
        if isinstance(volume, AsyncVolume):
            body.append({"path": path, "volume": volume.id, "read_only": volume.is_read_only})
        else:
            body.append({"path": path, "volume": volume, "read_only": False})
    return body
