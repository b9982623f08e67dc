"""Persistent volumes on this node: named directories that outlive sandboxes and restarts.

Each volume is its own sparse ext4 disk (`<data>/volumes/<vol-id>/disk.img`, with a journal,
so a host crash does not lose it) whose size is its quota: a full volume is ENOSPC inside
every sandbox that mounts it. Everything under `<data>/volumes` is root's alone (0700).

The disk is mounted on the host (`<vol-id>/mnt`, nodev, nosuid) only while a live sandbox
uses it: `acquire` mounts it before the runtime stages it, `release` unmounts it once the last
sandbox using it has ended, and `sweep` does the same for every volume after a restart, once
the engine has adopted what still runs. The runtimes never bind this mount directly: each
sandbox sees the volume through an idmapped mount of its own (`runtimes.base.prepare_host`),
so root in every sandbox is uid 0 on the volume whatever host uid range the sandbox has.

The host only ever touches a volume's root: it mounts, unmounts, measures (statvfs) and
deletes the disk as a whole, and never resolves a path inside it, so whatever a sandbox puts
there (symlinks to host paths, set-user-id files, device nodes) means nothing on the host.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from corral.core.errors import VolumeInUse, VolumeNotFound
from corral.core.ids import check_id, new_id
from corral.core.models import VolumeInfo
from corral.core.spec import DEFAULT_VOLUME_SIZE_MB, check_volume_size
from corral.host import mounts

log = logging.getLogger("corral.engine.volumes")

RECORD_NAME = "volume.json"

Users = Callable[[str], list[str]]  # ids of the live sandboxes that mount a volume


class VolumeStore:
    """The volumes under one directory, and which of them are mounted on the host.

    `users(volume_id)` tells which live sandboxes mount a volume (the engine knows); mounting
    and unmounting one volume are serialised by a lock of its own, so a create that mounts it
    and the end of the last sandbox using it never interleave.
    """

    def __init__(self, directory: Path, users: Users) -> None:
        self.directory = directory
        self._users = users
        self._locks: dict[str, asyncio.Lock] = {}

    def prepare(self) -> None:
        """Make the directory, root's alone: nobody else has any business in volumes."""
        self.directory.mkdir(mode=0o700, exist_ok=True)
        self.directory.chmod(0o700)

    # -- paths ------------------------------------------------------------------------------

    def path(self, volume_id: str) -> Path:
        return self.directory / check_id(volume_id, "vol")

    def mountpoint(self, volume_id: str) -> Path:
        """Where the volume's disk is mounted on the host while sandboxes use it."""
        return self.path(volume_id) / "mnt"

    def exists(self, volume_id: str) -> bool:
        path = self.path(volume_id)
        return (path / RECORD_NAME).is_file() and (path / "disk.img").is_file()

    def require(self, volume_id: str) -> None:
        """Raise `VolumeNotFound` unless the volume exists on this node."""
        if not self.exists(volume_id):
            raise VolumeNotFound(f"no volume {volume_id} on this node")

    def ids(self) -> list[str]:
        return sorted(p.name for p in self.directory.glob("vol-*") if self.exists(p.name))

    def _lock(self, volume_id: str) -> asyncio.Lock:
        return self._locks.setdefault(volume_id, asyncio.Lock())

    # -- life of a volume -------------------------------------------------------------------

    async def create(self, size_mb: int = DEFAULT_VOLUME_SIZE_MB) -> VolumeInfo:
        """Format a new, empty volume of `size_mb` MiB; its root belongs to uid 0, mode 0755."""
        check_volume_size(size_mb)
        volume_id = new_id("vol")
        await asyncio.to_thread(self._create, volume_id, size_mb)
        return await self.info(volume_id)

    def _create(self, volume_id: str, size_mb: int) -> None:
        # Built under a temporary name and renamed when complete: a crash leaves no half volume.
        partial = self.directory / f".new-{volume_id}"
        partial.mkdir(mode=0o700)
        try:
            mounts.format_disk(partial / "disk.img", size_mb, journal=True)
            (partial / "mnt").mkdir(mode=0o700)
            mounts.mount_disk(partial / "disk.img", partial / "mnt")
            try:
                root = partial / "mnt"
                (root / "lost+found").rmdir()  # fsck makes it again if it ever needs it
                root.chmod(0o755)
                used = _used_bytes(root)
            finally:
                mounts.unmount(partial / "mnt")
            _write_record(partial, {"size_mb": size_mb, "created_at": time.time(), "used": used})
            os.rename(partial, self.path(volume_id))
        except BaseException:
            mounts.remove_tree(partial)
            raise

    async def delete(self, volume_id: str) -> None:
        """Delete the volume and its data; `VolumeInUse` while live sandboxes mount it."""
        async with self._lock(volume_id):
            self.require(volume_id)
            users = self._users(volume_id)
            if users:
                raise VolumeInUse(
                    f"volume {volume_id} is mounted by {', '.join(users)}; "
                    "terminate those sandboxes first"
                )
            # remove_tree unmounts before deleting, and never deletes through a mount.
            await asyncio.to_thread(mounts.remove_tree, self.path(volume_id))

    async def info(self, volume_id: str) -> VolumeInfo:
        self.require(volume_id)
        path = self.path(volume_id)
        record = await asyncio.to_thread(_read_record, path)
        used = int(record.get("used", 0))
        mountpoint = path / "mnt"
        if await asyncio.to_thread(mounts.is_mount_point, mountpoint):
            used = await asyncio.to_thread(_used_bytes, mountpoint)
        return VolumeInfo(
            id=volume_id,
            size_mb=int(record["size_mb"]),
            created_at=float(record["created_at"]),
            used_bytes=used,
            sandboxes=tuple(self._users(volume_id)),
        )

    # -- host mounts ------------------------------------------------------------------------

    async def acquire(self, volume_ids: Iterable[str]) -> None:
        """Mount each volume on the host unless it is already (for a sandbox about to use it).

        The caller registers the sandbox first, so a concurrent `release` sees it as a user.
        """
        for volume_id in sorted(set(volume_ids)):
            async with self._lock(volume_id):
                self.require(volume_id)  # deleted since the sandbox was planned
                await asyncio.to_thread(self._mount, volume_id)

    def _mount(self, volume_id: str) -> None:
        mountpoint = self.mountpoint(volume_id)
        if mounts.is_mount_point(mountpoint):
            return
        mountpoint.mkdir(mode=0o700, exist_ok=True)
        mounts.mount_disk(self.path(volume_id) / "disk.img", mountpoint)

    async def release(self, volume_ids: Iterable[str]) -> None:
        """Unmount each volume no live sandbox uses any more, keeping its last usage."""
        for volume_id in sorted(set(volume_ids)):
            async with self._lock(volume_id):
                if self.exists(volume_id) and not self._users(volume_id):
                    await asyncio.to_thread(self._unmount, volume_id)

    def _unmount(self, volume_id: str) -> None:
        mountpoint = self.mountpoint(volume_id)
        if not mounts.is_mount_point(mountpoint):
            return
        path = self.path(volume_id)
        try:
            record = _read_record(path)
            record["used"] = _used_bytes(mountpoint)
            _write_record(path, record)
        except (OSError, ValueError) as exc:  # the usage is only informative
            log.warning("could not record the usage of %s: %s", volume_id, exc)
        mounts.unmount(mountpoint)

    async def sweep(self) -> None:
        """Unmount every volume that no live sandbox uses, and drop volumes whose creation a
        crash interrupted. Only for the engine holding the data directory (after adopting)."""
        for partial in await asyncio.to_thread(lambda: list(self.directory.glob(".new-*"))):
            await asyncio.to_thread(mounts.remove_tree, partial)
        await self.release(await asyncio.to_thread(self.ids))


def _used_bytes(root: Path) -> int:
    stats = os.statvfs(root)  # of the volume's root only: never a path inside it
    return (stats.f_blocks - stats.f_bfree) * stats.f_frsize


def _read_record(path: Path) -> dict[str, Any]:
    record = json.loads((path / RECORD_NAME).read_text())
    if not isinstance(record, dict):
        raise ValueError(f"{path / RECORD_NAME} is not a JSON object")
    return record


def _write_record(path: Path, record: dict[str, Any]) -> None:
    temp = path / f".{RECORD_NAME}.tmp"
    temp.write_text(json.dumps(record))
    os.replace(temp, path / RECORD_NAME)
