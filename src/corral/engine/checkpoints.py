"""Memory checkpoints of sandboxes: hibernate and wake, snapshots, and forks made from them.

A checkpoint saves a running sandbox's memory and files through its runtime (gVisor's runsc
today). No host socket may be open into the sandbox while it is taken, so the agent is asked to
hang up first (`AgentLink.quiesce`) and dials back by itself afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Protocol

from corral.core.errors import CorralError, InvalidRequest
from corral.core.ids import check_id
from corral.core.models import SandboxInfo, SnapshotInfo
from corral.core.spec import FIXED_AT_START, SandboxSpec
from corral.core.state import EndReason, SandboxState
from corral.engine.lifecycle import Lifecycle
from corral.engine.record import Phase, SandboxRecord
from corral.engine.registry import Registry
from corral.engine.runtime_set import RuntimeSet
from corral.engine.snapshots import Snapshot, SnapshotStore
from corral.engine.tasks import Tasks
from corral.runtimes import Runtime

log = logging.getLogger("corral.engine")

CHECKPOINT_DIR = "checkpoint"  # in a hibernated sandbox's directory: its memory and files
MAX_TTL = 30 * 24 * 3600.0  # of a snapshot
MAX_FORK = 64
FORK_CONCURRENCY = 3  # restores at once: 2 to 4 is fastest on 2 cores (measured)


class CreateFrom(Protocol):
    """`Engine.create`, as a fork calls it: a new sandbox from a snapshot."""

    def __call__(
        self, spec: SandboxSpec | None = None, *, snapshot: str | None = None
    ) -> Awaitable[SandboxInfo]: ...


class Checkpoints:
    """Hibernation, snapshots and forks of the sandboxes of one engine."""

    def __init__(
        self,
        registry: Registry,
        runtimes: RuntimeSet,
        lifecycle: Lifecycle,
        snapshots: SnapshotStore,
        tasks: Tasks,
    ) -> None:
        self._sealed = lifecycle.sealed
        self._registry = registry
        self._runtimes = runtimes
        self._lifecycle = lifecycle
        self.snapshots = snapshots
        self._tasks = tasks
        # The runtime's cleanup after a hibernation, which `wake` must let finish.
        self._forgetting: dict[str, asyncio.Task[None]] = {}

    def runtime_for(self, record: SandboxRecord, action: str) -> Runtime:
        """The sandbox's runtime, if it can checkpoint this sandbox; else a clear refusal."""
        runtime = self._runtimes.get(record.runtime)
        refusal = runtime.checkpoint_refusal(record.plan.network.policy)
        if refusal is not None:
            raise InvalidRequest(
                f"cannot {action} sandbox {record.id}: {refusal} (pause works under every runtime)",
                code="not_supported",
            )
        return runtime

    # -- hibernation ----------------------------------------------------------------------------

    async def hibernate(self, record: SandboxRecord, reason: str | None = None) -> SandboxInfo:
        """Write the sandbox's memory and files to disk and stop it; `wake` (or any use)
        restores it exactly: processes, open files, listeners, working directories.

        A hibernated sandbox holds no memory and no CPU, its lifetime stops, and it survives a
        restart of the engine. Only runtimes whose checkpoints keep memory can (gvisor), and
        not for internet sandboxes, which runsc cannot checkpoint. Streams open to the sandbox
        (exec output, file transfers) end; the processes behind them go on.
        """
        runtime = self.runtime_for(record, "hibernate")
        plan = record.plan
        failure: CorralError | None = None
        async with record.lock:
            record.require("hibernate", SandboxState.RUNNING, SandboxState.PAUSED)
            if record.state is SandboxState.PAUSED:  # runsc checkpoints a running sandbox
                await asyncio.to_thread(runtime.resume, plan)
                record.move(Phase.RUNNING, "resumed to hibernate")
            record.move(Phase.HIBERNATING)
            try:
                await record.link.quiesce()
                image = plan.dir / CHECKPOINT_DIR
                await asyncio.to_thread(self._sealed.checkpoint, runtime, plan, image)
            except CorralError as exc:
                failure = exc
                record.move(Phase.RUNNING)
                with contextlib.suppress(OSError):
                    await record.link.listen()  # the agent dials back; the sandbox goes on
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(record.exited.wait(), 10)
                record.launch = None
                self._forgetting[record.id] = self._tasks.spawn(
                    asyncio.to_thread(runtime.forget, plan)
                )
                record.move(Phase.HIBERNATED, reason)
        if failure is not None:
            if record.exited.is_set():  # runsc kills a sandbox it fails to checkpoint
                detail = f"hibernating failed: {failure}"
                await self._lifecycle.end(record, EndReason.RUNTIME_ERROR, detail)
            raise failure
        return record.info()

    async def wake(self, record: SandboxRecord) -> SandboxInfo:
        """Restore a hibernated sandbox where it was; returns once its agent answers."""
        runtime = self._runtimes.get(record.runtime)
        plan = record.plan
        async with record.lock:
            record.require("wake", SandboxState.HIBERNATED)
            started = time.perf_counter()
            await self.settled(record)
            image = plan.dir / CHECKPOINT_DIR
            async with self._lifecycle.gate.turn(urgent=True), self._sealed.opened(image) as clear:
                await self._lifecycle.start_runtime(record, lambda: runtime.restore(plan, clear))
                await self._lifecycle.wait_for_agent(record)
            record.timings["wake"] = time.perf_counter() - started  # asked for, or on use
            record.move(Phase.RUNNING)
            # The image is stale from the first write on: never restore it twice.
            await asyncio.to_thread(shutil.rmtree, image, True)
        return record.info()

    async def settled(self, record: SandboxRecord) -> None:
        """Once a hibernated sandbox's runtime has forgotten it (`restore` needs that done)."""
        forgetting = self._forgetting.pop(record.id, None)
        if forgetting is not None:
            await asyncio.wait({forgetting})
        else:  # hibernated by an earlier engine, which may have stopped before this
            await asyncio.to_thread(self._runtimes.get(record.runtime).forget, record.plan)

    # -- snapshots ---------------------------------------------------------------------------

    async def snapshot(
        self,
        record: SandboxRecord,
        *,
        ttl: float | None = None,
        name: str | None = None,
        owner: str | None = None,
    ) -> SnapshotInfo:
        """Save the sandbox's memory and files as a snapshot; it goes on running."""
        runtime = self.runtime_for(record, "snapshot")
        if ttl is not None and (
            isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 1 <= ttl <= MAX_TTL
        ):
            raise InvalidRequest(f"ttl must be 1 to {MAX_TTL:g} seconds (30 days), or none")
        async with record.lock:
            record.require("snapshot", SandboxState.RUNNING, SandboxState.PAUSED)
            with self.snapshots.writing() as (snapshot_id, temp):
                await self._checkpoint_running(record, runtime, temp)
                taken = await self.commit(record, snapshot_id, temp, ttl, name=name, owner=owner)
        record.touch()
        return taken

    async def commit(
        self,
        record: SandboxRecord,
        snapshot_id: str,
        temp: Path,
        ttl: float | None,
        *,
        name: str | None = None,
        owner: str | None = None,
    ) -> SnapshotInfo:
        """The checkpoint of `record` written into `temp` (from `snapshots.writing`), made a
        snapshot deleted `ttl` seconds from now."""
        now = time.time()
        info = SnapshotInfo(
            id=snapshot_id,
            sandbox_id=record.id,
            runtime=record.runtime,
            image=record.spec.image,
            created_at=now,
            expires_at=now + ttl if ttl is not None else None,
            size_bytes=0,
            name=name,
            owner=owner,
        )
        taken = await asyncio.to_thread(
            self.snapshots.commit, temp, info, record.spec, record.link.secret
        )
        return taken.info

    async def _checkpoint_running(self, record: SandboxRecord, runtime: Runtime, to: Path) -> None:
        """Checkpoint the sandbox into `to` and leave it as it was (running, or paused)."""
        plan = record.plan
        paused = record.state is SandboxState.PAUSED
        if paused:  # runsc checkpoints a running sandbox
            await asyncio.to_thread(runtime.resume, plan)
        try:
            await record.link.quiesce()
            await asyncio.to_thread(self._sealed.checkpoint, runtime, plan, to, leave_running=True)
        finally:
            with contextlib.suppress(OSError):
                await record.link.listen()  # the agent dials back
            if paused:
                await asyncio.to_thread(runtime.pause, plan)

    def restoring(self, snapshot_id: str, spec: SandboxSpec) -> tuple[SandboxSpec, Snapshot]:
        """The spec of a sandbox started from a snapshot, and the snapshot: what is fixed at
        start (and the volumes its processes may have open) is the snapshot's; env, metadata,
        lifetime and the lifecycle options come from `spec`."""
        taken = self.snapshots.get(check_id(snapshot_id, "sn"))
        fixed = {name: getattr(taken.spec, name) for name in (*FIXED_AT_START, "volumes")}
        env = {**taken.spec.env, **spec.env}
        return dataclasses.replace(spec, env=env, **fixed), taken

    async def delete_snapshot(self, snapshot_id: str) -> None:
        check_id(snapshot_id, "sn")
        await asyncio.to_thread(self.snapshots.delete, snapshot_id)

    # -- forks ---------------------------------------------------------------------------------

    async def fork(
        self, record: SandboxRecord, count: int, create: CreateFrom
    ) -> list[SandboxInfo]:
        """`count` new sandboxes with this one's memory and files, diverging from now on: a
        snapshot taken for the purpose and deleted after, restored a few at a time. All or
        nothing: if one fails, the others are ended and the error is raised."""
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_FORK:
            raise InvalidRequest(f"count must be 1 to {MAX_FORK}")
        taken = await self.snapshot(record)
        gate = asyncio.Semaphore(FORK_CONCURRENCY)

        async def one() -> SandboxInfo:
            async with gate:
                return await create(record.spec, snapshot=taken.id)

        try:
            made = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
        finally:
            await self.delete_snapshot(taken.id)
        ok = [result for result in made if isinstance(result, SandboxInfo)]
        failed = [result for result in made if isinstance(result, BaseException)]
        if failed:
            await asyncio.gather(
                *(
                    self._lifecycle.end(self._registry.get(info.id), EndReason.USER, "fork failed")
                    for info in ok
                ),
                return_exceptions=True,
            )
            raise failed[0]
        return ok
