"""The service: the engine as tenants see it. Every sandbox, image and volume belongs to the API
key that made it.

It owns the engine and the store, records each sandbox's owner and every state change in the
store, and answers "not found" for another key's sandbox, image or volume (by id or by name),
so ids cannot be probed. On start it
reconciles the store with what the engine re-adopted: sandboxes that did not survive a restart
are marked ended with the reason, sandboxes nobody owns are ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.builder import Builder, Progress
from corral.engine import Engine
from corral.errors import (
    Conflict,
    ImageNotFound,
    InvalidRequest,
    LimitReached,
    NotFound,
    SandboxNotFound,
    VolumeNotFound,
)
from corral.ids import check_id
from corral.layers import Manifest
from corral.models import SandboxInfo, StateChange
from corral.snapshots import SnapshotInfo
from corral.spec import SandboxSpec
from corral.state import EndReason, SandboxState, parse_state
from corral.store import ENDED_RETENTION, ApiKey, ImageEntry, Store, VolumeEntry
from corral.volumes import VolumeInfo, check_size

log = logging.getLogger("corral.server")

PRUNE_EVERY = 3600.0
EVENT_BACKLOG = 1000  # events kept for one slow reader of /v1/events
_IMAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,127}$")
RESERVED_IMAGE_NAMES = ("debian", "host", "usage", "prune")
_VOLUME_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


def check_image_name(name: str) -> str:
    if (
        not isinstance(name, str)
        or not _IMAGE_NAME.match(name)
        or name.startswith("im-")
        or name in RESERVED_IMAGE_NAMES
    ):
        raise InvalidRequest(
            f"{name!r} cannot name an image: use 1 to 128 lowercase letters, digits, '.', '_' "
            f"or '-', not starting with 'im-' and not one of {', '.join(RESERVED_IMAGE_NAMES)}"
        )
    return name


def check_volume_name(name: str) -> str:
    if not isinstance(name, str) or not _VOLUME_NAME.match(name) or name.startswith("vol-"):
        raise InvalidRequest(
            f"{name!r} cannot name a volume: use 1 to 64 lowercase letters, digits, '.', '_' "
            "or '-', not starting with 'vol-'"
        )
    return name


@dataclass
class ServerConfig:
    """How the server runs; every field has an embedded default."""

    data_dir: Path
    default_runtime: str | None = None
    max_body_bytes: int = 1024 * 1024  # JSON bodies; file uploads stream and are not limited
    max_sandboxes_per_key: int = 100
    max_sandboxes: int = 2000  # live sandboxes on this node, all keys together
    pools: tuple[tuple[str, SandboxSpec, int], ...] = ()  # (name, template, size)
    max_output_bytes: int = 8 * 1024 * 1024  # per stream of a command run to completion
    max_blob_bytes: int = 8 * 1024**3  # one upload for an image build (an archive, copied files)
    max_volumes_per_key: int = 100

    @property
    def database(self) -> Path:
        return self.data_dir / "corral.db"


class Service:
    """The engine and the store behind the HTTP API, with tenant checks."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.engine = Engine(
            config.data_dir, default_runtime=config.default_runtime, on_change=self._changed
        )
        self.store: Store | None = None
        self._owners: dict[str, str] = {}  # live sandbox id -> key id
        self._creating = 0  # creates in flight count against the limits too
        self._creating_by: dict[str, int] = {}
        self._writes: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self.builder = Builder(self.engine)
        self._subscribers: dict[str, set[asyncio.Queue[dict[str, Any]]]] = {}

    async def start(self) -> None:
        self.store = await Store.open(self.config.database)
        await self.engine.start()  # re-adopts the sandboxes a previous server left running
        await self._reconcile()
        for name, template, size in self.config.pools:
            self.engine.configure_pool(name, template, size)
        self._tasks = [
            asyncio.create_task(self._write_loop()),
            asyncio.create_task(self._prune_loop()),
        ]

    async def close(self) -> None:
        """Stop serving but leave every sandbox running: the next start re-adopts them."""
        await self.engine.close(keep_sandboxes=True)
        await self._writes.join()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.store is not None:
            await self.store.close()

    @property
    def db(self) -> Store:
        assert self.store is not None, "the service is not started"
        return self.store

    async def _reconcile(self) -> None:
        known = {info.id for info in self.engine.list_sandboxes()}
        for info in await self.db.live_sandboxes():
            if info.id in known:
                continue
            now = time.time()
            lost = dataclasses.replace(
                info,
                state=SandboxState.TERMINATED,
                expires_at=None,
                ended_at=now,
                end_reason=EndReason.RUNTIME_ERROR,
                end_detail="the sandbox was gone when the server restarted",
                history=(*info.history, StateChange(SandboxState.TERMINATED, now, "runtime_error")),
            )
            await self.db.update_sandbox(lost)
        for info in self.engine.list_sandboxes():
            owner = await self.db.owner(info.id)
            if owner is None:
                log.warning("ending %s: no key owns it (created just before a crash)", info.id)
                await self.engine.terminate(info.id)
                continue
            await self.db.update_sandbox(self.engine.get(info.id))
            if info.state is not SandboxState.TERMINATED:
                self._owners[info.id] = owner

    def _changed(self, info: SandboxInfo) -> None:
        owner = self._owners.get(info.id)
        if info.state is SandboxState.TERMINATED:
            self._owners.pop(info.id, None)
        self._writes.put_nowait(("update", info))
        if owner is not None:
            self._publish(owner, info)

    # -- events -----------------------------------------------------------------------------

    def _publish(self, owner: str, info: SandboxInfo) -> None:
        """Tell `owner`'s event streams about the sandbox's latest state change."""
        last = info.history[-1] if info.history else None
        event = {
            "type": "sandbox.state",
            "sandbox_id": info.id,
            "state": info.state.value,
            "reason": last.reason if last else None,
            "at": last.at if last else time.time(),
            "end_reason": info.end_reason.value if info.end_reason else None,
            "end_detail": info.end_detail,
        }
        for queue in self._subscribers.get(owner, ()):
            if queue.full():  # a reader that does not keep up loses its stream, not memory
                queue.get_nowait()
                queue.put_nowait({"type": "events.lost", "at": time.time()})
            else:
                queue.put_nowait(event)

    @contextlib.contextmanager
    def subscribe(self, key: ApiKey) -> Iterator[asyncio.Queue[dict[str, Any]]]:
        """A queue of the state changes of `key`'s sandboxes, for as long as the block runs."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(EVENT_BACKLOG)
        self._subscribers.setdefault(key.id, set()).add(queue)
        try:
            yield queue
        finally:
            self._subscribers[key.id].discard(queue)
            if not self._subscribers[key.id]:
                del self._subscribers[key.id]

    async def _write_loop(self) -> None:
        """Apply catalogue writes one at a time, in the order the changes happened."""
        while True:
            kind, item = await self._writes.get()
            try:
                if kind == "add":
                    owner, sandbox_id = item
                    await self.db.add_sandbox(owner, self.engine.get(sandbox_id))
                else:
                    await self.db.update_sandbox(item)
            except Exception:
                log.exception("could not record a sandbox change")
            finally:
                self._writes.task_done()

    async def _prune_loop(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.db.forget_ended(time.time() - ENDED_RETENTION)
            await asyncio.sleep(PRUNE_EVERY)

    # -- tenants ----------------------------------------------------------------------------

    async def owned(self, key: ApiKey, sandbox_id: str) -> str:
        """`sandbox_id` if `key` owns it; another key's sandbox is "not found" too."""
        check_id(sandbox_id, "sb")
        owner = self._owners.get(sandbox_id)
        if owner is None:
            owner = await self.db.owner(sandbox_id)
        if owner != key.id:
            raise SandboxNotFound(
                f"no sandbox {sandbox_id} (it never existed, ended more than 7 days ago, "
                "or belongs to another API key)"
            )
        return sandbox_id

    async def create(
        self,
        key: ApiKey,
        spec: SandboxSpec,
        *,
        pool: bool = True,
        snapshot: str | None = None,
    ) -> SandboxInfo:
        """A sandbox for `key`: from `spec`, or from one of its snapshots (by id or name)."""
        # The engine takes ids only: names and ids of this key's own images, volumes and
        # snapshots are resolved here, so another key's are "not found" before it sees them.
        volumes = [
            dataclasses.replace(mount, volume=await self.volume_for(key, mount.volume))
            for mount in spec.volumes
        ]
        spec = dataclasses.replace(spec, volumes=tuple(volumes))
        if snapshot is not None:
            snapshot = self.snapshot_for(key, snapshot).id
        else:
            spec = dataclasses.replace(spec, image=await self.image_for(key, spec.image))
        async with self._creating_for(key, 1):
            info = await self.engine.create(spec, pool=pool, snapshot=snapshot)
            self._adopt_new(key, info)
        await self._writes.join()
        return self.engine.get(info.id)

    async def fork(self, key: ApiKey, sandbox_id: str, count: int) -> list[SandboxInfo]:
        """`count` copies of one of `key`'s sandboxes, memory and files (see `Engine.fork`)."""
        await self.owned(key, sandbox_id)
        async with self._creating_for(key, count if isinstance(count, int) else 1):
            made = await self.engine.fork(sandbox_id, count)
            for info in made:
                self._adopt_new(key, info)
        await self._writes.join()
        return [self.engine.get(info.id) for info in made]

    @contextlib.asynccontextmanager
    async def _creating_for(self, key: ApiKey, count: int) -> AsyncIterator[None]:
        """Count `count` creates in flight against the limits, or refuse them at once (429
        with a time to retry, rather than queueing until the client times out)."""
        if len(self._owners) + self._creating + count > self.config.max_sandboxes:
            raise LimitReached(
                f"this node runs the most sandboxes it is configured for "
                f"({self.config.max_sandboxes}); retry shortly",
                code="node_full",
                retry_after=5,
            )
        mine = sum(1 for owner in self._owners.values() if owner == key.id)
        mine += self._creating_by.get(key.id, 0)
        if mine + count > self.config.max_sandboxes_per_key:
            raise LimitReached(
                f"this API key has {mine} live sandboxes and may have "
                f"{self.config.max_sandboxes_per_key}; terminate some and retry",
                code="too_many_sandboxes",
                retry_after=5,
            )
        self._creating += count
        self._creating_by[key.id] = self._creating_by.get(key.id, 0) + count
        try:
            yield
        finally:
            self._creating -= count
            self._creating_by[key.id] -= count

    def _adopt_new(self, key: ApiKey, info: SandboxInfo) -> None:
        # No await between the engine's create and this: the sandbox cannot change unrecorded.
        self._owners[info.id] = key.id
        self._writes.put_nowait(("add", (key.id, info.id)))
        self._publish(key.id, self.engine.get(info.id))  # its earlier changes had no owner yet

    # -- snapshots ----------------------------------------------------------------------------

    async def snapshot(
        self, key: ApiKey, sandbox_id: str, name: str | None, ttl: float | None
    ) -> SnapshotInfo:
        await self.owned(key, sandbox_id)
        if name is not None:
            check_image_name(name)
            if any(s.name == name for s in self.snapshots_of(key)):
                raise Conflict(
                    f"you have a snapshot named {name!r} already; delete it or pick another name",
                    code="name_taken",
                )
        return await self.engine.snapshot(sandbox_id, ttl=ttl, name=name, owner=key.id)

    def snapshots_of(self, key: ApiKey) -> list[SnapshotInfo]:
        return [s for s in self.engine.list_snapshots() if s.owner == key.id]

    def snapshot_for(self, key: ApiKey, ref: str) -> SnapshotInfo:
        """`key`'s snapshot whose id or name is `ref`; another key's is "not found" too."""
        for snapshot in self.snapshots_of(key):
            if ref in (snapshot.id, snapshot.name):
                return snapshot
        raise NotFound(
            f"you have no snapshot {ref!r} (deleted, expired, or never taken)",
            code="snapshot_not_found",
        )

    async def delete_snapshot(self, key: ApiKey, ref: str) -> None:
        await self.engine.delete_snapshot(self.snapshot_for(key, ref).id)

    # -- images -----------------------------------------------------------------------------

    async def image_for(self, key: ApiKey, ref: str) -> str:
        """What the engine calls image `ref` of `key`: a built-in name, or a built image's id."""
        if self.engine.images.is_builtin(ref):
            return ref
        entry = await self.db.find_image(key.id, ref)
        if entry is None:
            raise ImageNotFound(
                f"no image {ref!r}: use debian, host, or the id or name of an image you built "
                "(corral image list)"
            )
        return entry.id

    async def build_image(
        self, key: ApiKey, recipe: Any, name: str | None, progress: Progress
    ) -> dict[str, Any]:
        """Build `recipe` for `key` (see `corral.builder`); the image as `describe_image`."""
        if name is not None:
            check_image_name(name)
        manifest = await self.builder.build(recipe, progress)
        entry = await self.db.add_image(key.id, manifest.id, name)
        return self._describe(entry, manifest)

    async def snapshot_filesystem(
        self, key: ApiKey, sandbox_id: str, name: str | None
    ) -> dict[str, Any]:
        """The sandbox's files as a new image of `key` (see `Builder.snapshot_filesystem`)."""
        await self.owned(key, sandbox_id)
        if name is not None:
            check_image_name(name)
        manifest = await self.builder.snapshot_filesystem(sandbox_id)
        entry = await self.db.add_image(key.id, manifest.id, name)
        return self._describe(entry, manifest)

    async def list_images(self, key: ApiKey) -> list[dict[str, Any]]:
        found = []
        for entry in await self.db.list_images(key.id):
            manifest = self.engine.images.built.manifest(entry.id)
            if manifest is not None:
                found.append(self._describe(entry, manifest))
        return found

    async def describe_image(self, key: ApiKey, ref: str) -> dict[str, Any]:
        entry = await self.db.find_image(key.id, ref)
        manifest = self.engine.images.built.manifest(entry.id) if entry else None
        if entry is None or manifest is None:
            raise ImageNotFound(f"you have no image {ref!r} (corral image list shows yours)")
        return self._describe(entry, manifest)

    async def remove_image(self, key: ApiKey, ref: str) -> None:
        """Forget `key`'s image; its layers go at the next prune if no other image uses them."""
        await self.db.remove_image(key.id, ref)

    async def prune_images(self) -> dict[str, Any]:
        """Remove the layers and blobs no key's image and no live sandbox uses."""
        keep = await self.db.image_ids()
        keep |= {s.image for s in self.engine.list_snapshots()}  # their sandboxes need it
        in_use = self.engine.layers_in_use()
        store = self.engine.images.built
        freed = await asyncio.to_thread(store.prune, keep, in_use)
        return {**freed, **await asyncio.to_thread(store.usage)}

    @staticmethod
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

    # -- volumes ----------------------------------------------------------------------------

    async def volume_for(self, key: ApiKey, ref: str) -> str:
        """The id of `key`'s volume named or numbered `ref`."""
        return (await self._volume_entry(key, ref)).id

    async def _volume_entry(self, key: ApiKey, ref: str) -> VolumeEntry:
        entry = await self.db.find_volume(key.id, ref)
        if entry is None:
            raise VolumeNotFound(
                f"no volume {ref!r}: give the name or id of a volume you made "
                "(corral volume list shows yours)"
            )
        return entry

    async def create_volume(self, key: ApiKey, name: str, size_mb: int) -> dict[str, Any]:
        """Make an empty volume for `key`; `Conflict` (volume_exists) if it has the name."""
        check_volume_name(name)
        check_size(size_mb)
        if await self.db.find_volume(key.id, name) is not None:
            raise Conflict(f"you already have a volume named {name!r}", code="volume_exists")
        if len(await self.db.list_volumes(key.id)) >= self.config.max_volumes_per_key:
            raise LimitReached(
                f"this API key has {self.config.max_volumes_per_key} volumes, the most allowed; "
                "delete some first",
                code="too_many_volumes",
            )
        # The disk first, then the row: a crash in between leaves a disk nobody sees (space
        # only for its empty filesystem), never a volume whose data is missing.
        made = await self.engine.create_volume(size_mb)
        entry = VolumeEntry(made.id, name, made.size_mb, made.created_at)
        try:
            await self.db.add_volume(key.id, entry)
        except BaseException:
            await self.engine.delete_volume(made.id)  # e.g. the same name made concurrently
            raise
        return self._describe_volume(entry, made)

    async def describe_volume(self, key: ApiKey, ref: str) -> dict[str, Any]:
        entry = await self._volume_entry(key, ref)
        return self._describe_volume(entry, await self.engine.volume(entry.id))

    async def list_volumes(self, key: ApiKey) -> list[dict[str, Any]]:
        found = []
        for entry in await self.db.list_volumes(key.id):
            try:
                info = await self.engine.volume(entry.id)
            except VolumeNotFound:  # its disk is gone (deleted by hand): listed, empty
                info = VolumeInfo(entry.id, entry.size_mb, entry.created_at, 0)
            found.append(self._describe_volume(entry, info))
        return found

    async def delete_volume(self, key: ApiKey, ref: str) -> None:
        """Delete `key`'s volume and its data; `VolumeInUse` while sandboxes mount it."""
        volume_id = await self.volume_for(key, ref)
        with contextlib.suppress(VolumeNotFound):  # its disk is gone already: forget it
            await self.engine.delete_volume(volume_id)
        await self.db.remove_volume(key.id, volume_id)

    @staticmethod
    def _describe_volume(entry: VolumeEntry, info: VolumeInfo) -> dict[str, Any]:
        return {
            "id": entry.id,
            "name": entry.name,
            "size_mb": entry.size_mb,
            "created_at": entry.created_at,
            "used_bytes": info.used_bytes,
            "sandboxes": list(info.sandboxes),
        }

    async def info(self, key: ApiKey, sandbox_id: str) -> SandboxInfo:
        await self.owned(key, sandbox_id)
        with contextlib.suppress(SandboxNotFound):
            return self.engine.get(sandbox_id)
        found = await self.db.get_sandbox(sandbox_id)
        if found is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id}")
        return found[1]

    async def list(
        self, key: ApiKey, state: str | None, metadata: Mapping[str, str]
    ) -> list[SandboxInfo]:
        wanted = parse_state(state) if state is not None else None
        found = []
        for stored in await self.db.list_sandboxes(owner=key.id):
            try:
                info = self.engine.get(stored.id)
            except SandboxNotFound:
                info = stored
            if wanted is not None and info.state is not wanted:
                continue
            if any(info.spec.metadata.get(k) != v for k, v in metadata.items()):
                continue
            found.append(info)
        return found
