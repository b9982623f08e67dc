"""Sandboxes that move from one engine to another (a cluster's nodes), keeping their ids.

A move is a hibernation on one node and a wake on another. The node it leaves hibernates it
and hands its checkpoint off as a snapshot (`hand_off`; the files are linked, not copied),
which the cluster's front copies to the other node like any snapshot. That node takes it in
(`take_in`): a sandbox under the same id, planned with its own host resources, hibernated,
with the checkpoint as its memory; the next use wakes it there. Then the node it left forgets
it (`gone`), or, if the move failed, keeps it as it was (`stay`).

While it moves, the leaving node refuses every change to it (`sandbox_moving`, 409), a wake
on use included: it must not run in two places.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from pathlib import Path

from corral.core.errors import Conflict, InvalidRequest, SandboxFailed
from corral.core.ids import check_id
from corral.core.models import SandboxInfo, SnapshotInfo, StateChange
from corral.core.state import SandboxState
from corral.engine.checkpoints import CHECKPOINT_DIR, Checkpoints
from corral.engine.lifecycle import Lifecycle, make_dir_and_save
from corral.engine.record import Phase, SandboxRecord
from corral.engine.registry import Registry
from corral.engine.runtime_set import RuntimeSet
from corral.images.store import ImageStore

HAND_OFF_TTL = 3600.0  # a hand-off's snapshot, if the move is never finished
# A move that the front neither finished nor undid by then (it stopped mid-move) is overdue:
# the node settles it by the store (`corral.server.service`).
LEAVE_TIMEOUT = 600.0


class Moving:
    """The moves of one engine's sandboxes, both ways."""

    def __init__(
        self,
        registry: Registry,
        runtimes: RuntimeSet,
        lifecycle: Lifecycle,
        checkpoints: Checkpoints,
        *,
        images: ImageStore,
    ) -> None:
        self._registry = registry
        self._images = images
        self._runtimes = runtimes
        self._lifecycle = lifecycle
        self._checkpoints = checkpoints
        self._snapshots = checkpoints.snapshots
        # sandbox id -> its hand-off snapshot's id, and when it was handed off
        self._handed: dict[str, tuple[str, float]] = {}

    async def hand_off(self, sandbox_id: str, to: str) -> tuple[SnapshotInfo, SandboxInfo]:
        """Hibernate the sandbox (if it is not) and make its checkpoint a snapshot for node
        `to`; from now on it is `leaving`. Returns the snapshot and the sandbox as it was."""
        record = self._registry.get(sandbox_id)
        before = record.info()
        if record.plan.volumes:
            raise InvalidRequest(
                f"sandbox {sandbox_id} has volumes, which are this node's: it cannot move",
                code="not_movable",
            )
        self._checkpoints.runtime_for(record, "move")
        if record.state is not SandboxState.HIBERNATED:
            await self._checkpoints.hibernate(record, f"moving to node {to}")
        async with record.lock:
            record.require("move", SandboxState.HIBERNATED)
            record.leaving = to
            try:
                taken = await self._snapshot_of(record)
            except BaseException:
                record.leaving = None
                raise
        self._handed[sandbox_id] = (taken.id, time.monotonic())
        return taken, before

    def overdue(self) -> list[str]:
        """The sandboxes handed off more than `LEAVE_TIMEOUT` ago and still leaving."""
        since, found = time.monotonic() - LEAVE_TIMEOUT, []
        for sandbox_id, (_, handed_at) in self._handed.items():
            record = self._registry.find(sandbox_id)
            if handed_at <= since and record is not None and record.leaving is not None:
                found.append(sandbox_id)
        return found

    async def _snapshot_of(self, record: SandboxRecord) -> SnapshotInfo:
        """The hibernated sandbox's checkpoint, as a snapshot nobody lists (no owner)."""
        with self._snapshots.writing() as (snapshot_id, temp):
            await asyncio.to_thread(_link_files, record.plan.dir / CHECKPOINT_DIR, temp)
            return await self._checkpoints.commit(record, snapshot_id, temp, HAND_OFF_TTL)

    async def stay(self, sandbox_id: str) -> SandboxInfo:
        """The move failed: the sandbox stays here, hibernated, as before its hand-off."""
        record = self._leaving(sandbox_id)
        record.leaving = None
        await self._drop_hand_off(sandbox_id)
        return record.info()

    async def gone(self, sandbox_id: str) -> None:
        """The sandbox lives on another node now: forget it here, recording nothing (its
        story goes on there)."""
        record = self._leaving(sandbox_id)
        async with record.lock:
            await self._checkpoints.settled(record)  # runsc's own cleanup, after the hand-off
            await asyncio.to_thread(self._runtimes.get(record.runtime).destroy, record.plan)
            await self._lifecycle.forget_egress(record)
            self._registry.discard(sandbox_id)
        await self._drop_hand_off(sandbox_id)

    async def forget_moved(self, sandbox_id: str, now_on: str) -> None:
        """Forget a hibernated sandbox that moved to node `now_on` before this engine could
        forget it (it stopped between the move and `gone`)."""
        record = self._registry.get(sandbox_id)
        async with record.lock:
            record.require("forget", SandboxState.HIBERNATED)
            record.leaving = now_on
        await self.gone(sandbox_id)

    def _leaving(self, sandbox_id: str) -> SandboxRecord:
        record = self._registry.get(sandbox_id)
        if record.leaving is None:
            raise Conflict(f"sandbox {sandbox_id} is not moving", code="not_moving")
        return record

    async def _drop_hand_off(self, sandbox_id: str) -> None:
        handed = self._handed.pop(sandbox_id, None)
        if handed is not None:
            await self._checkpoints.delete_snapshot(handed[0])

    async def take_in(
        self,
        sandbox_id: str,
        snapshot_id: str,
        *,
        created_at: float,
        history: Sequence[StateChange],
        remaining: float | None,
    ) -> SandboxInfo:
        """Sandbox `sandbox_id`, moving here: hibernated, its memory and files the checkpoint
        in snapshot `snapshot_id` (which this uses up), its story the one it had."""
        check_id(sandbox_id, "sb")
        if self._registry.find(sandbox_id) is not None:
            raise Conflict(f"sandbox {sandbox_id} is here already", code="sandbox_exists")
        taken = self._snapshots.get(check_id(snapshot_id, "sn"))
        if taken.info.sandbox_id != sandbox_id:
            raise InvalidRequest(
                f"snapshot {snapshot_id} is not a checkpoint of sandbox {sandbox_id}",
                code="invalid_archive",
            )
        spec = taken.spec
        runtime = self._runtimes.check(spec.runtime or self._runtimes.default)
        image = await asyncio.to_thread(self._images.resolve, spec.image, None)
        if self._registry.find(sandbox_id) is not None:  # taken in meanwhile
            raise Conflict(f"sandbox {sandbox_id} is here already", code="sandbox_exists")
        plan = self._lifecycle.plan(spec, image, sandbox_id=sandbox_id)
        record = SandboxRecord(
            spec, plan, secret=taken.agent_secret, keys=self._lifecycle.sealed.keys
        )
        record.created_at, record.history, record.remaining = created_at, list(history), remaining
        record.phase, record.state = Phase.HIBERNATED, SandboxState.HIBERNATED
        self._registry.add(record)
        try:
            await asyncio.to_thread(make_dir_and_save, record)
            await asyncio.to_thread(runtime.create, plan)
            await self._lifecycle.apply_egress(record)
            await asyncio.to_thread(
                self._snapshots.take_out, snapshot_id, plan.dir / CHECKPOINT_DIR
            )
        except BaseException:
            await asyncio.to_thread(runtime.destroy, plan)
            await self._lifecycle.forget_egress(record)
            self._registry.discard(sandbox_id)
            raise
        record.save()
        return record.info()


def _link_files(source: Path, into: Path) -> None:
    """Hard-link every file under `source` into `into` (same file system: nothing copied)."""
    for path in sorted(source.rglob("*")):
        target = into / path.relative_to(source)
        if path.is_symlink() or not (path.is_dir() or path.is_file()):
            raise SandboxFailed(f"the checkpoint of {source.parent.name} holds {path.name}")
        if path.is_dir():
            target.mkdir(mode=0o700, exist_ok=True)
        else:
            os.link(path, target)
