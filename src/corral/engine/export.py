"""What a sandbox changed in its files, copied out as an image layer from one consistent moment.

Where the runtime keeps the sandbox's writable layer on the host (`Runtime.writable_layer`),
the sandbox is frozen while that layer is copied. Where it does not (gVisor keeps it inside the
sandbox), a fork of the sandbox is listed and compared with the image on the host
(`corral.images.fsdiff`) and packs its own changes; the sandbox itself is not disturbed.
Everything the sandbox sends is bounded, in memory and on disk: it could print without end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from corral.core.errors import PayloadTooLarge, SandboxFailed
from corral.core.models import SandboxInfo
from corral.engine.access import Access
from corral.engine.commands import Commands
from corral.engine.files import SandboxFiles
from corral.engine.record import SandboxRecord
from corral.engine.registry import Registry
from corral.engine.runtime_set import RuntimeSet
from corral.host import userns
from corral.images import fsdiff, oci
from corral.images.layers import export_changes

MiB = 1024 * 1024
MAX_LISTING = 64 * MiB  # a sandbox's list of its files
PACK_CHANGED = ("tar", "--null", "--no-recursion", "--numeric-owner", "-C", "/", "-cf", "-")
CHANGED_LIST = "/tmp/.corral-changed"  # in the fork: /tmp is not part of its files

Fork = Callable[[SandboxRecord], Awaitable[SandboxInfo]]  # one copy of a sandbox, as it is now
End = Callable[[str], Awaitable[object]]


class Exporter:
    """Copies sandboxes' changes out as layers (see `Engine.export_changes`)."""

    def __init__(
        self,
        *,
        registry: Registry,
        runtimes: RuntimeSet,
        access: Access,
        commands: Commands,
        files: Callable[[str], SandboxFiles],
        fork: Fork,
        end: End,
    ) -> None:
        self._registry = registry
        self._runtimes = runtimes
        self._access = access
        self._commands = commands
        self._files = files
        self._fork = fork
        self._end = end

    async def export_changes(self, sandbox_id: str, dest: Path) -> None:
        """Copy what the sandbox changed into the empty directory `dest`, as a layer."""
        record = self._access.running(sandbox_id, "export the files of")
        runtime = self._runtimes.get(record.runtime)
        upper = runtime.writable_layer(record.plan)
        if upper is None:
            await self._export_by_diff(record, dest)
            return
        async with record.lock:  # frozen while copied: one consistent moment of its files
            await asyncio.to_thread(runtime.pause, record.plan)
            try:
                uid = userns.host_uid(record.plan.uid_slot)
                await asyncio.to_thread(export_changes, upper, dest, uid, userns.RANGE)
            finally:
                await asyncio.to_thread(runtime.resume, record.plan)

    async def _export_by_diff(self, record: SandboxRecord, dest: Path) -> None:
        copy = await self._fork(record)  # a still picture of this moment
        archive = dest.with_name(f"{dest.name}.tar")
        try:
            # Stop every process of the copy but its agent (pid 1), so nothing writes while
            # it is listed and packed.
            await self._commands.run(copy.id, "kill -STOP -1 2>/dev/null; true")
            changed, deleted = await self._changes(self._registry.get(copy.id))
            names = "\0".join(path.lstrip("/") for path in changed)
            await self._files(copy.id).write(CHANGED_LIST, names)
            most = record.plan.limits.disk_bytes + 64 * MiB
            await self._pack(copy.id, archive, most)
            await asyncio.to_thread(fsdiff.add_whiteouts, archive, deleted)
            await asyncio.to_thread(dest.rmdir)  # unpack_layer makes it, atomically
            await asyncio.to_thread(oci.unpack_layer, archive, dest)
        finally:
            archive.unlink(missing_ok=True)
            await self._end(copy.id)

    async def _changes(self, copy: SandboxRecord) -> tuple[list[str], list[str]]:
        """What the copy changed (paths to pack) and deleted, compared with its image."""
        listed = bytearray()
        listing = await self._commands.exec(copy.id, ["sh", "-c", fsdiff.LISTING], timeout=600)
        async for stream, data in listing.output():
            if stream == "stdout":
                listed += data
                _within(len(listed), MAX_LISTING, "its list of files")
        if (await listing.wait()).exit_code != 0:
            raise SandboxFailed("listing the sandbox's files failed (it needs GNU find)")
        guest, mounts = fsdiff.parse_listing(bytes(listed))
        root = self._runtimes.get(copy.runtime).image_root(copy.plan)
        uid = userns.host_uid(copy.plan.uid_slot)
        lower = await asyncio.to_thread(fsdiff.host_listing, root, uid, userns.RANGE)
        return fsdiff.changes(guest, lower, mounts)

    async def _pack(self, copy_id: str, archive: Path, most: int) -> None:
        """Have the copy tar the paths in `CHANGED_LIST` into `archive`, at most `most` bytes."""
        packing = await self._commands.exec(copy_id, [*PACK_CHANGED, "-T", CHANGED_LIST])
        written = 0
        with archive.open("wb") as out:
            async for stream, data in packing.output():
                if stream == "stdout":
                    written += len(data)
                    _within(written, most, "its changed files")
                    await asyncio.to_thread(out.write, data)
        packed = await packing.wait()
        if packed.exit_code != 0:
            raise SandboxFailed(
                "packing the sandbox's changed files failed (it needs GNU tar): "
                + packed.stderr.decode(errors="replace")[-500:]
            )


def _within(size: int, limit: int, what: str) -> None:
    """Refuse sandbox output past `limit` bytes (a sandbox could print without end)."""
    if size > limit:
        raise PayloadTooLarge(
            f"the sandbox sent more than {limit // MiB} MiB as {what}; a sandbox's changes "
            "cannot exceed its disk"
        )
