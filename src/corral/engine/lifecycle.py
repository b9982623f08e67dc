"""Sandboxes from start to end: start one, watch its runtime, pause and resume it, end it and
release everything it holds."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from pathlib import Path

from corral.agent import protocol as P
from corral.core.egress import EgressPolicy
from corral.core.errors import CorralError, InvalidRequest, SandboxEnded, SandboxFailed
from corral.core.ids import check_id
from corral.core.models import SandboxInfo, SnapshotInfo
from corral.core.spec import FIXED_AT_START, SandboxSpec
from corral.core.state import EndReason, SandboxState
from corral.engine.boots import BootImages, BootKey, boot_key, key_for
from corral.engine.egress import Egress
from corral.engine.gate import StartGate
from corral.engine.planner import plan_sandbox
from corral.engine.record import Phase, SandboxRecord, new_secret
from corral.engine.registry import Registry
from corral.engine.runtime_set import RuntimeSet
from corral.engine.sealed_images import SealedImages
from corral.engine.snapshots import Snapshot, SnapshotStore
from corral.engine.tasks import Tasks, finish_in_thread
from corral.engine.volumes import VolumeStore
from corral.host import network, userns
from corral.host.procs import process_start_time
from corral.images.store import ImageStore, RootImage, StatusLine
from corral.runtimes import Launch, Runtime
from corral.runtimes.base import make_sandbox_dir
from corral.runtimes.plan import SandboxPlan

log = logging.getLogger("corral.engine")

FILL_WEIGHT = 10  # CPU weight of a sandbox starting for a pool: it yields to live work


class Stopwatch:
    """Seconds between consecutive marks, by the name of the stage each ends."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = now - self._last
        self._last = now


class Lifecycle:
    """Starts, watches, pauses, resumes and ends the sandboxes of one engine."""

    def __init__(
        self,
        *,
        data_dir: Path,
        registry: Registry,
        runtimes: RuntimeSet,
        images: ImageStore,
        volumes: VolumeStore,
        tasks: Tasks,
        agent_timeout: float,
        sealed: SealedImages,
        egress: Egress,
        boot_images: bool = True,
        start_limit: int | None = None,
    ) -> None:
        self._data_dir = data_dir
        self.gate = StartGate(start_limit)
        self.boots = BootImages(data_dir / "boots", sealed.keys, tasks, self._boot_image)
        self.boots.enabled = boot_images
        self.egress = egress
        self.sealed = sealed
        self._registry = registry
        self._runtimes = runtimes
        self._images = images
        self._volumes = volumes
        self._tasks = tasks
        self._agent_timeout = agent_timeout
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._firewall_ready = False
        self._firewall_lock = asyncio.Lock()
        # While the engine adopts what a previous one left, volumes are released by one sweep
        # at the end: a sandbox not yet adopted may still use them.
        self.adopting = False

    def prepare(self, spec: SandboxSpec) -> tuple[SandboxSpec, Runtime]:
        """`spec` with its runtime named, and that runtime; refuses what cannot start."""
        runtime = self._runtimes.check(spec.runtime or self._runtimes.default)
        spec = spec.with_runtime(runtime.name)
        refusal = runtime.checkpoint_refusal(spec.network)
        if "hibernate" in (spec.on_idle, spec.on_timeout) and refusal is not None:
            raise InvalidRequest(
                f"on_idle/on_timeout='hibernate' needs a sandbox that can be checkpointed, and "
                f"this one ({runtime.name}, network {spec.network}) cannot: {refusal}; "
                "use 'pause' or 'terminate'",
                code="not_supported",
            )
        for mount in spec.volumes:
            self._volumes.require(check_id(mount.volume, "vol"))
        return spec, runtime

    async def create(
        self,
        spec: SandboxSpec,
        runtime: Runtime,
        progress: StatusLine | None,
        restore: Snapshot | None = None,
    ) -> SandboxInfo:
        """A new running sandbox for `spec` (started from snapshot `restore`, if given)."""
        record = await self.start(spec, runtime, progress, restore=restore)
        record.start_lifetime(spec)
        return record.info()

    async def start(
        self,
        spec: SandboxSpec,
        runtime: Runtime,
        progress: StatusLine | None,
        *,
        for_pool: bool = False,
        restore: Snapshot | None = None,
        template: bool = False,
    ) -> SandboxRecord:
        """Build and start a sandbox for `spec`, up to its agent answering (still creating);
        on any failure nothing of it is left behind. Without `restore`, it is restored from its
        configuration's boot image where there is one (`corral.engine.boots`); `template`: it
        is booted to be saved as one."""
        stages = Stopwatch()
        image = await asyncio.to_thread(self._images.resolve, spec.image, progress)
        if spec.network == "internet":
            await self.ensure_firewall()
        refusal = runtime.checkpoint_refusal(spec.network)
        key = None if restore or template else key_for(spec, image, refusal)
        boot = self.boots.find(key) if key is not None else None
        stages.mark("image")
        # Planning picks a free uid range and address among registered sandboxes: register the
        # new one before the next await, so concurrent creates never pick the same.
        plan = self.plan(spec, image, for_pool=for_pool, template=template)
        restore = restore or boot
        # A restored agent holds its snapshot's secret already (None: a v1 agent).
        secret = new_secret() if restore is None else restore.agent_secret
        record = SandboxRecord(spec, plan, for_pool=for_pool, secret=secret, keys=self.sealed.keys)
        record.timings = stages.laps
        self._registry.add(record)
        stages.mark("plan")
        try:
            await self._build(record, runtime, stages, restore.path if restore else None)
            if boot is not None:
                await self._identify(record)
                stages.mark("identify")
        except BaseException as exc:
            await self._abandon(record, runtime)
            if key is not None and boot is not None and isinstance(exc, Exception):
                log.warning("restoring a boot image of %s failed (%s)", spec.image, exc)
                if self.boots.discard(key):  # not tried twice; made again later
                    return await self.start(spec, runtime, progress, for_pool=for_pool)
            if isinstance(exc, CorralError | asyncio.CancelledError):
                raise
            raise SandboxFailed(f"could not create the sandbox: {exc}") from exc
        if key is not None and boot is None:
            self.boots.want(key, spec)
        return record

    def plan(
        self,
        spec: SandboxSpec,
        image: RootImage,
        *,
        for_pool: bool = False,
        template: bool = False,
        sandbox_id: str | None = None,
    ) -> SandboxPlan:
        """A plan for `spec` on `image` with host resources no registered sandbox holds."""
        return plan_sandbox(
            spec,
            image,
            data_dir=self._data_dir,
            live=[record.plan for record in self._registry.live()],
            volume_mountpoint=self._volumes.mountpoint,
            scope=self.egress.scope,
            cpu_weight=FILL_WEIGHT if for_pool else 100,
            template=template,
            sandbox_id=sandbox_id,
        )

    async def _identify(self, record: SandboxRecord) -> None:
        """Before anyone can see it, a sandbox restored from a boot image takes its own
        hostname and a secret of its own: the image's is every restored sandbox's."""
        secret = new_secret()
        params = {"hostname": record.plan.hostname, "secret": secret.hex()}
        async with asyncio.timeout(self._agent_timeout):
            await record.link.call(P.IDENTIFY, params)
        await record.link.rekey(secret)
        self.boots.restored += 1

    async def _boot_image(
        self, spec: SandboxSpec, store: SnapshotStore
    ) -> tuple[Snapshot, BootKey]:
        """Boot a template sandbox of `spec`'s configuration, save it into `store`, end it."""
        template = SandboxSpec(**{name: getattr(spec, name) for name in FIXED_AT_START})
        runtime = self._runtimes.check(template.runtime or self._runtimes.default)
        record = await self.start(template, runtime, None, for_pool=True, template=True)
        plan = record.plan
        try:
            with store.writing() as (snapshot_id, temp):
                await record.link.quiesce()
                # In the clear: the store is in memory (see `corral.engine.boots`).
                await asyncio.to_thread(runtime.checkpoint, plan, temp)
                info = SnapshotInfo(
                    id=snapshot_id,
                    sandbox_id=record.id,
                    runtime=record.runtime,
                    image=template.image,
                    created_at=time.time(),
                    expires_at=None,
                    size_bytes=0,
                )
                image = await asyncio.to_thread(
                    store.commit, temp, info, template, record.link.secret
                )
        finally:
            await self.end(record, EndReason.ENGINE_SHUTDOWN, "boot image saved")
        return image, boot_key(template, plan.layers, [(b.source, b.target) for b in plan.binds])

    async def _build(
        self, record: SandboxRecord, runtime: Runtime, stages: Stopwatch, restore_from: Path | None
    ) -> None:
        plan = record.plan
        # Recorded before anything is built, so a later engine finds and cleans up what a
        # crash in the middle would leave.
        await finish_in_thread(lambda: make_dir_and_save(record))
        stages.mark("record")
        if plan.volumes:  # registered above, so no `release` unmounts them under us
            await self._volumes.acquire(v.volume_id for v in plan.volumes)
        async with self.gate.turn(urgent=record.claimed):  # a pool's fill is not
            stages.mark("start_queue")
            async with self._step(record):
                await finish_in_thread(lambda: runtime.create(plan))
                await self.apply_egress(record)  # before anything in it runs
            stages.mark("runtime_create")
            if restore_from is None:
                # A restored agent holds its secret already; a new one reads it, once.
                record.link.write_key(userns.host_uid(plan.uid_slot))
                async with self._step(record):
                    await self.start_runtime(record, lambda: runtime.start(plan))
                stages.mark("runtime_start")
                await self.wait_for_agent(record)
            else:
                async with self.sealed.opened(restore_from) as image:
                    async with self._step(record):
                        await self.start_runtime(record, lambda: runtime.restore(plan, image))
                    stages.mark("runtime_start")
                    await self.wait_for_agent(record)
            stages.mark("agent_ready")

    @contextlib.asynccontextmanager
    async def _step(self, record: SandboxRecord) -> AsyncIterator[None]:
        """A step of a start that builds on the host: `end` waits for it, then undoes all of
        it, rather than undoing it while it builds; a sandbox ended before it is not built."""
        async with record.lock:
            if record.gone:  # ended while it waited (terminated, engine closing)
                raise SandboxEnded(f"sandbox {record.id} ended before it started")
            yield

    async def _abandon(self, record: SandboxRecord, runtime: Runtime) -> None:
        """Undo a start that failed half-way. Its address and uid slot stay taken until all of
        it is gone: a sandbox planned meanwhile must not get its veth or firewall rules."""
        if record.gone:  # `end` has released (or releases) it all
            return
        try:
            record.move(Phase.ENDING)
            await record.link.close()
            with contextlib.suppress(Exception):
                await asyncio.to_thread(runtime.destroy, record.plan)
            with contextlib.suppress(Exception):
                await self.forget_egress(record)
            with contextlib.suppress(Exception):
                await self.release_volumes(record)
        finally:
            self._registry.discard(record.id)

    async def start_runtime(self, record: SandboxRecord, launch: Callable[[], Launch]) -> None:
        """Listen for the sandbox's agent, start its runtime with `launch` and watch it."""
        record.exited = asyncio.Event()
        await record.link.listen()
        try:
            started = await finish_in_thread(launch)
            started.start_time = await asyncio.to_thread(process_start_time, started.pid)
        except CorralError:
            await record.link.close()
            raise
        record.launch = started
        self.watch(record)

    async def wait_for_agent(self, record: SandboxRecord) -> None:
        """Return once the sandbox's agent answers; `SandboxFailed` if its runtime exits
        first, `AgentUnavailable` if the agent does not answer in time."""
        connected = asyncio.ensure_future(record.link.wait_connected(self._agent_timeout))
        exited = asyncio.ensure_future(record.exited.wait())
        try:
            await asyncio.wait({connected, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
        if connected.done():
            connected.result()  # raises AgentUnavailable on timeout
            return
        connected.cancel()
        raise SandboxFailed(
            f"the {record.runtime} runtime exited while starting the sandbox"
            + (f": {record.end_detail}" if record.end_detail else ""),
            code="runtime_failed",
        )

    # -- watching ---------------------------------------------------------------------------

    def watch(self, record: SandboxRecord) -> None:
        """Wait, in the background, for the sandbox's runtime to exit; then record why."""
        task = self._tasks.spawn(self._watch(record))
        self._watchers[record.id] = task
        task.add_done_callback(lambda done: self._forget_watcher(record.id, done))

    def _forget_watcher(self, sandbox_id: str, task: asyncio.Task[None]) -> None:
        if self._watchers.get(sandbox_id) is task:
            del self._watchers[sandbox_id]

    async def stop_watching(self, record: SandboxRecord) -> None:
        watcher = self._watchers.pop(record.id, None)
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _watch(self, record: SandboxRecord) -> None:
        launch = record.launch
        assert launch is not None
        await _exit_of(launch)
        if launch.child is not None:
            record.exit_status = launch.child.wait()
        if record.phase is Phase.HIBERNATING:  # its runtime stops by design
            record.exited.set()
            return
        runtime = self._runtimes.get(record.runtime)
        detail = await asyncio.to_thread(runtime.log_tail, record.plan)
        record.end_detail = detail or None
        record.exited.set()
        if record.phase in (Phase.CREATING, Phase.WARMING):
            return  # `start` reports the failure itself
        if record.ending or not record.alive:
            return
        oom = await asyncio.to_thread(runtime.oom_kills, record.plan)
        status = record.exit_status
        if status == 0:
            reason = EndReason.EXITED
        elif oom:
            reason = EndReason.OUT_OF_MEMORY
        else:
            reason = EndReason.RUNTIME_ERROR
        unknown = f"exit status {status}" if status is not None else "exit status unknown"
        await self.end(record, reason, detail or unknown)

    # -- changes of a running sandbox ----------------------------------------------------------

    async def pause(self, record: SandboxRecord, reason: str | None = None) -> SandboxInfo:
        async with record.lock:
            record.require("pause", SandboxState.RUNNING)
            if record.link.waker is not None:  # it dozes: runsc pauses only a thawed sandbox
                await record.link.waker()
            await asyncio.to_thread(self._runtimes.get(record.runtime).pause, record.plan)
            record.move(Phase.PAUSED, reason)
        return record.info()

    async def resume(self, record: SandboxRecord) -> SandboxInfo:
        async with record.lock:
            record.require("resume", SandboxState.PAUSED)
            await asyncio.to_thread(self._runtimes.get(record.runtime).resume, record.plan)
            record.move(Phase.RUNNING)
        return record.info()

    # -- the end ------------------------------------------------------------------------------

    async def end(
        self, record: SandboxRecord, reason: EndReason, detail: str | None = None
    ) -> None:
        """Stop the sandbox for `reason` and release everything it holds. Idempotent."""
        async with record.lock:
            if not record.alive:
                return
            record.require_staying("end")
            if not record.ending:
                record.move(Phase.ENDING)
            await record.link.close()
            try:
                await asyncio.to_thread(self._runtimes.get(record.runtime).destroy, record.plan)
            except CorralError as exc:
                log.error("cleaning up %s failed: %s", record.id, exc)
                detail = f"{detail or ''} (cleanup failed: {exc.message})".strip()
            await self.forget_egress(record)
            record.end(reason, detail)
            self._registry.forget_old()
        await self.release_volumes(record)
        # The watcher reaps the runtime's process once it has gone; let it finish.
        if record.launch is not None:  # none yet: ended while it waited its turn
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(record.exited.wait(), 10)

    async def release_volumes(self, record: SandboxRecord) -> None:
        """After the sandbox ended: unmount its volumes from the host unless others use them."""
        if record.plan.volumes and not self.adopting:
            try:
                await self._volumes.release(v.volume_id for v in record.plan.volumes)
            except CorralError as exc:  # they stay mounted; the next sweep tries again
                log.error("could not unmount the volumes of %s: %s", record.id, exc)

    async def ensure_firewall(self, adopted: Sequence[SandboxRecord] = ()) -> None:
        """Start the resolver and egress proxy and install the internet sandboxes' firewall,
        once per engine, with the rules of the `adopted` sandboxes in it."""
        async with self._firewall_lock:  # concurrent first creates install it once
            if not self._firewall_ready:
                ports = await self.egress.start()
                found = [(r.plan.network.index, r.spec.egress) for r in adopted]
                rules = [rule for rule in (self.egress.rules(*f) for f in found) if rule]
                await asyncio.to_thread(network.install_firewall, self.egress.scope, *ports, rules)
                self.egress.installed([slot for slot, _, _ in rules])
                self._firewall_ready = True

    async def apply_egress(self, record: SandboxRecord) -> None:
        """Put an internet sandbox's egress rules (and the operator's floor) in force."""
        if record.spec.network == "internet":
            await self.egress.apply(record.plan.network.index, record.spec.egress)

    async def set_egress(self, record: SandboxRecord, egress: EgressPolicy | None) -> SandboxInfo:
        spec = replace(record.spec, egress=egress)  # refuses rules for a sandbox without internet
        record.require(
            "change the network rules of",
            SandboxState.RUNNING,
            SandboxState.PAUSED,
            SandboxState.HIBERNATED,
        )
        await self.egress.apply(record.plan.network.index, egress)  # in force before it shows
        record.spec = spec
        record.save()
        return record.info()

    async def forget_egress(self, record: SandboxRecord) -> None:
        if record.plan.network.policy == "internet":
            await self.egress.forget(record.id, record.plan.network.index)


def make_dir_and_save(record: SandboxRecord) -> None:
    make_sandbox_dir(record.plan)
    record.save()


async def _exit_of(launch: Launch) -> None:
    """Return once the process `launch` started has exited. Works for processes an earlier
    engine started too (pidfds need no parenthood), and never mistakes a later process that
    reuses the pid for it."""
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(launch.pid)
    except ProcessLookupError:
        return
    reused = launch.start_time is not None and process_start_time(launch.pid) != launch.start_time
    if reused:  # it has exited (its number may already be another's)
        os.close(pidfd)
        return
    gone = loop.create_future()
    loop.add_reader(pidfd, lambda: None if gone.done() else gone.set_result(None))
    try:
        await gone
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
