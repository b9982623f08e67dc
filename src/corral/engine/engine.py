"""The engine: the per-node owner of sandboxes, a thin facade over parts with one job each.

    registry      the sandboxes by id, and who hears of their changes    (registry.py)
    lifecycle     start, watch, pause, resume, end                       (lifecycle.py)
    supervisor    lifetimes, idle timeouts, snapshot ttls                (supervision.py)
    doze          idle gVisor sandboxes frozen until their next use       (doze.py)
    adoption      handing sandboxes from one engine to the next          (adoption.py)
    commands      processes and the agent's answers                      (commands.py)
    interpreter   code contexts, run_code                                (interpreter.py)
    checkpoints   hibernate, wake, snapshots, forks                      (checkpoints.py)
    moving        sandboxes moving to and from other engines (nodes)     (moving.py)
    pools         warm pools                                             (pools.py)
    exporter      a sandbox's changes as an image layer                  (export.py)
    usage         CPU, memory, disk and network of each sandbox, sampled  (usage.py)
    egress        resolver, proxy and firewall rules of internet sandboxes (egress/)
    volumes       persistent volumes                                     (volumes.py)

Sandboxes do not depend on the engine's process: `close(keep_sandboxes=True)` (or a crash)
leaves them running, and the next engine on the same data directory adopts them.

Example:
    >>> async with Engine("/var/lib/corral") as engine:
    ...     info = await engine.create(SandboxSpec(runtime="namespaces"))
    ...     result = await engine.run(info.id, "python3 -c 'print(6*7)'")
    ...     result.stdout
    b'42\\n'
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from corral.core.egress import EgressPolicy
from corral.core.errors import SandboxFailed
from corral.core.ids import check_id
from corral.core.models import ExecResult, ProcessInfo, SandboxInfo, SnapshotInfo, VolumeInfo
from corral.core.spec import DEFAULT_VOLUME_SIZE_MB, SandboxSpec
from corral.core.state import EndReason, SandboxState
from corral.engine import gate
from corral.engine.access import Access
from corral.engine.adoption import Adoption
from corral.engine.checkpoints import Checkpoints
from corral.engine.commands import Commands
from corral.engine.datadir import (
    default_data_dir,
    install_programs,
    lock_data_dir,
    prepare_data_dir,
)
from corral.engine.doze import DOZE_AFTER, Doze
from corral.engine.egress import Egress, EgressSettings
from corral.engine.export import Exporter
from corral.engine.files import SandboxFiles
from corral.engine.interpreter import Interpreter
from corral.engine.lifecycle import Lifecycle
from corral.engine.moving import Moving
from corral.engine.pools import PoolKeeper
from corral.engine.ports import Ports
from corral.engine.process import Process
from corral.engine.record import SandboxRecord
from corral.engine.registry import Registry
from corral.engine.runtime_set import RuntimeSet
from corral.engine.sealed_images import SealedImages
from corral.engine.sealing import KEY_FILE, KeyRing
from corral.engine.snapshots import SnapshotStore
from corral.engine.supervision import Supervisor
from corral.engine.tasks import Tasks
from corral.engine.usage import Usage
from corral.engine.volumes import VolumeStore
from corral.host.scope import HostScope
from corral.images.store import ImageStore, StatusLine

__all__ = ["Engine", "default_data_dir", "lock_data_dir"]


class Engine:
    """Creates, runs and ends sandboxes on this machine. Use as an async context manager.

    `on_change`, if given, is called from the event loop with a sandbox's new `SandboxInfo` after
    every change of its state (adoptions that end a sandbox included); whatever it raises is
    logged, never propagated. One engine per data directory: it adopts every sandbox there.
    """

    _started = False
    _lock_fd: int | None = None  # the data directory's lock while started

    def __init__(
        self,
        data_dir: Path | str | None = None,
        *,
        default_runtime: str | None = None,
        runsc_path: str | None = None,
        agent_timeout: float = 30.0,
        on_change: Callable[[SandboxInfo], None] | None = None,
        at_rest_key: Path | None = None,
        egress: EgressSettings | None = None,
        boot_images: bool = True,
        scope: HostScope | None = None,
        node: str | None = None,
        start_limit: int | None = None,  # starts at once (`corral.engine.gate`); 0: no bound
        doze_after: float | None = DOZE_AFTER,  # idle seconds (`corral.engine.doze`); None: never
    ) -> None:
        self.data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
        self.keys = KeyRing(path=at_rest_key or self.data_dir / KEY_FILE, create=not at_rest_key)
        self.images = ImageStore(self.data_dir / "images")
        self.snapshots = SnapshotStore(self.data_dir / "snapshots", self.keys)
        self.node = node or socket.gethostname()  # this machine's name in `SandboxInfo.node`
        self.registry = registry = Registry(on_change, self.node)
        self.volumes = VolumeStore(self.data_dir / "volumes", registry.volume_users)
        runtimes = RuntimeSet(self.data_dir, default=default_runtime, runsc=runsc_path)
        self.runtimes, self.scope = runtimes, scope or HostScope()
        tasks = self._tasks = Tasks()
        self.egress = Egress(egress or EgressSettings(), registry.internet_at, self.scope)
        lifecycle = self._lifecycle = Lifecycle(
            data_dir=self.data_dir,
            registry=registry,
            runtimes=runtimes,
            images=self.images,
            volumes=self.volumes,
            tasks=tasks,
            agent_timeout=agent_timeout,
            sealed=SealedImages(self.keys, self.data_dir / "staging"),
            egress=self.egress,
            boot_images=boot_images,
            start_limit=gate.default_limit() if start_limit is None else start_limit or None,
        )
        self.boots, self.starts = lifecycle.boots, lifecycle.gate  # starts wait their turn there
        checkpoints = self._checkpoints = Checkpoints(
            registry, runtimes, lifecycle, self.snapshots, tasks
        )
        self.moving = Moving(registry, runtimes, lifecycle, checkpoints, images=self.images)
        access = self._access = Access(registry, lifecycle.resume, checkpoints.wake)
        self._commands = Commands(access, runtimes)
        self.interpreter = Interpreter(access, runtimes)  # code contexts and run_code
        self.ports = Ports(access)  # TCP connections to ports in sandboxes
        self.usage = Usage(registry)  # what each sandbox uses, sampled every few seconds
        self.doze = Doze(registry, runtimes, tasks, doze_after)  # idle sandboxes frozen
        self._supervisor = Supervisor(registry=registry, lifecycle=lifecycle,
            checkpoints=checkpoints, tasks=tasks, doze=self.doze)  # fmt: skip
        self._adoption = Adoption(
            self.data_dir, registry, runtimes, lifecycle=lifecycle, volumes=self.volumes
        )
        self._pools = PoolKeeper(registry=registry, runtimes=runtimes, lifecycle=lifecycle,
                                 access=access)  # fmt: skip
        self.pools = self._pools.pools

    # -- life of the engine ------------------------------------------------------------------------

    async def start(self) -> Engine:
        """Prepare the data directory, adopt the sandboxes found there, start the reaper.

        Idempotent. Sandboxes a previous engine left running (closed with `keep_sandboxes`, or
        killed) are adopted as they were; those whose runtime has died meanwhile are cleaned
        up and recorded as ended (`runtime_error`); those past their lifetime end (`timeout`).
        """
        if self._started:
            return self
        await asyncio.to_thread(prepare_data_dir, self.data_dir)
        self._lock_fd = lock_data_dir(self.data_dir)
        try:  # only now: a second engine started by mistake must not touch the first's files
            await asyncio.to_thread(self._prepare)
        except BaseException:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise
        self._started = True
        await asyncio.to_thread(self.boots.prepare)  # the directory is ours alone now
        await self._adoption.adopt_all()
        self._supervisor.start()
        self.usage.start()
        return self

    def _prepare(self) -> None:
        self._adoption.check_scope(self.scope)
        install_programs(self.data_dir)
        self.keys.check()
        self.images.built.prepare()
        self.snapshots.load()
        self.volumes.prepare()

    async def close(self, *, keep_sandboxes: bool = False) -> None:
        """Stop the engine: terminate every sandbox (reason: engine shutdown), or keep them.

        With `keep_sandboxes=True`, running and paused sandboxes go on running, with their
        records on disk, for the next engine on this data directory to adopt; only the
        reaper, the watchers and the agents' sockets stop (the agents re-dial by themselves).
        Sandboxes still being created are ended either way.
        """
        await self._pools.close()  # idle pooled sandboxes are never kept: pools refill
        await self.boots.stop()
        await self._supervisor.stop()
        await self.usage.stop()
        live = self.registry.live()
        kept = [record for record in live if keep_sandboxes and _keepable(record)]
        await asyncio.gather(*(self._adoption.release(r) for r in kept), return_exceptions=True)
        ended = (self._lifecycle.end(r, EndReason.ENGINE_SHUTDOWN) for r in live if r not in kept)
        await asyncio.gather(*ended, return_exceptions=True)
        await self._tasks.close()  # watchers finishing an ending, background ends
        await self.egress.close()
        self._started = False
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the data directory for the next engine
            self._lock_fd = None

    async def __aenter__(self) -> Engine:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _require_started(self) -> None:
        if not self._started:
            raise SandboxFailed(
                "the engine is not started; use `async with Engine(...)`", code="not_started"
            )

    # -- sandboxes ---------------------------------------------------------------------------------

    async def create(
        self,
        spec: SandboxSpec | None = None,
        *,
        pool: bool = True,
        progress: StatusLine | None = None,
        snapshot: str | None = None,
    ) -> SandboxInfo:
        """Create and start a sandbox; return once its agent answers.

        A warm pool whose template matches `spec` hands over an idle sandbox instead (unless
        `pool=False`). With `snapshot`, it starts where that snapshot's sandbox was, with its
        image, runtime and resources (`Checkpoints.restoring`). Raises `InvalidRequest` or
        `RuntimeUnavailable` for a bad spec, `SandboxFailed` if the runtime fails: nothing left.
        """
        self._require_started()
        spec = spec or SandboxSpec()
        taken = None
        if snapshot is not None:
            spec, taken = self._checkpoints.restoring(snapshot, spec)
        spec, runtime = self._lifecycle.prepare(spec)
        # Volumes are mounted when a sandbox starts, so a pooled sandbox (started without
        # them) can never serve a create that has some.
        claimed = None
        if pool and taken is None and not spec.volumes:
            claimed = await self._pools.take(spec)
        if claimed is None:
            async with self._pools.user_create():
                claimed = await self._lifecycle.create(spec, runtime, progress, taken)
        self._supervisor.wake()
        return claimed

    async def set_egress(self, sandbox_id: str, egress: EgressPolicy | None) -> SandboxInfo:
        """Change an internet sandbox's egress rules; connections already open stay open."""
        return await self._lifecycle.set_egress(self.registry.get(sandbox_id), egress)

    def get(self, sandbox_id: str) -> SandboxInfo:
        """What is known about a sandbox, ended ones included (the last 1000)."""
        return self.registry.get(sandbox_id).info()

    def list_sandboxes(
        self, *, state: SandboxState | str | None = None, metadata: Mapping[str, str] | None = None
    ) -> list[SandboxInfo]:
        """Sandboxes in creation order, optionally only those in `state` whose metadata match."""
        return self.registry.list(state=state, metadata=metadata)

    async def terminate(
        self,
        sandbox_id: str,
        *,
        reason: EndReason = EndReason.USER,
        detail: str = "terminated by request",
    ) -> SandboxInfo:
        """End a sandbox now (for `reason`). Ending an ended sandbox is a no-op."""
        record = self.registry.get(sandbox_id)
        await self._lifecycle.end(record, reason, detail)
        return record.info()

    async def pause(self, sandbox_id: str, *, reason: str | None = None) -> SandboxInfo:
        """Freeze every process of a running sandbox: memory stays, CPU use and the lifetime
        stop. Any use resumes it (unless its spec says `auto_resume=False`)."""
        return await self._lifecycle.pause(self.registry.get(sandbox_id), reason)

    async def resume(self, sandbox_id: str) -> SandboxInfo:
        """Thaw a paused sandbox (`wake` is for a hibernated one)."""
        info = await self._lifecycle.resume(self.registry.get(sandbox_id))
        self._supervisor.wake()
        return info

    async def set_timeout(self, sandbox_id: str, seconds: float) -> SandboxInfo:
        """Make the sandbox end `seconds` from now (at most 24 h)."""
        info = self.registry.get(sandbox_id).set_timeout(seconds)
        self._supervisor.wake()
        return info

    @contextlib.contextmanager
    def active(self, sandbox_id: str) -> Iterator[None]:
        """Count the sandbox as in use for as long as the block runs (an attached stream)."""
        with self._access.active(sandbox_id):
            yield

    # -- memory: hibernate, snapshots, forks -------------------------------------------------------

    async def hibernate(self, sandbox_id: str, *, reason: str | None = None) -> SandboxInfo:
        """Save a sandbox's memory and files to disk and stop it; `wake` or any use restores it."""
        return await self._checkpoints.hibernate(self.registry.get(sandbox_id), reason)

    async def wake(self, sandbox_id: str) -> SandboxInfo:
        """Restore a hibernated sandbox where it was; returns once its agent answers."""
        info = await self._checkpoints.wake(self.registry.get(sandbox_id))
        self._supervisor.wake()
        return info

    async def snapshot(
        self,
        sandbox_id: str,
        *,
        ttl: float | None = None,
        name: str | None = None,
        owner: str | None = None,
    ) -> SnapshotInfo:
        """Save the sandbox's memory and files as a snapshot, deleted `ttl` seconds later; the
        sandbox goes on running. `create(snapshot=...)` starts copies of this moment."""
        record = self.registry.get(sandbox_id)
        return await self._checkpoints.snapshot(record, ttl=ttl, name=name, owner=owner)

    def list_snapshots(self) -> list[SnapshotInfo]:
        return [snapshot.info for snapshot in self.snapshots.all()]

    def get_snapshot(self, snapshot_id: str) -> SnapshotInfo:
        return self.snapshots.get(check_id(snapshot_id, "sn")).info

    async def delete_snapshot(self, snapshot_id: str) -> None:
        await self._checkpoints.delete_snapshot(snapshot_id)

    async def fork(self, sandbox_id: str, count: int) -> list[SandboxInfo]:
        """`count` new sandboxes with this one's memory and files (all or nothing)."""
        record = self.registry.get(sandbox_id)
        return await self._checkpoints.fork(record, count, self.create)

    async def _fork_one(self, record: SandboxRecord) -> SandboxInfo:
        self._checkpoints.runtime_for(record, "export the files of")
        return (await self.fork(record.id, 1))[0]

    # -- processes ---------------------------------------------------------------------------------

    async def exec(
        self,
        sandbox_id: str,
        argv: Sequence[str] | None = None,
        *,
        cmd: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | int | None = None,
        stdin: bool = False,
        pty: tuple[int, int] | None = None,
        timeout: float | None = None,
        tag: str | None = None,
    ) -> Process:
        """Start a process: `argv`, or `cmd` run by the shell. Returns once it has started.

        `pty=(rows, cols)` gives it a terminal (stdout and stderr then arrive merged);
        `timeout` kills it (and its process group) after that many seconds.
        """
        return await self._commands.exec(
            sandbox_id,
            argv,
            cmd=cmd,
            env=env,
            cwd=cwd,
            user=user,
            stdin=stdin,
            pty=pty,
            timeout=timeout,
            tag=tag,
        )

    async def run(
        self,
        sandbox_id: str,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | int | None = None,
        timeout: float | None = 60.0,
        stdin: bytes | None = None,
    ) -> ExecResult:
        """Run a command to completion and return its exit code and output.

        A string runs through the shell; a list is an argv. A command past `timeout` seconds
        is killed and its result says `timed_out`.
        """
        return await self._commands.run(
            sandbox_id, cmd, env=env, cwd=cwd, user=user, timeout=timeout, stdin=stdin
        )

    async def processes(self, sandbox_id: str) -> list[ProcessInfo]:
        """Processes the agent started in this sandbox (running and recently ended)."""
        return await self._commands.processes(sandbox_id)

    async def signal(
        self, sandbox_id: str, process_id: int, sig: int | str = signal.SIGTERM
    ) -> None:
        """Send a signal to a process (and its group; SIGKILL: everything it started)."""
        await self._commands.signal(sandbox_id, process_id, sig)

    async def kill_all(self, sandbox_id: str) -> int:
        """Kill every process in the sandbox but its agent; return how many there were."""
        return await self._commands.kill_all(sandbox_id)

    async def ping(self, sandbox_id: str) -> float:
        """Round trip to the sandbox's guest agent, in seconds."""
        return await self._commands.ping(sandbox_id)

    # -- files and images --------------------------------------------------------------------------

    def files(self, sandbox_id: str) -> SandboxFiles:
        """The file API of a running sandbox."""
        record = self.registry.get(sandbox_id)
        action = "use the files of"
        if not record.spec.auto_resume:
            self._access.running(sandbox_id, action)
        ready = functools.partial(self._access.use, sandbox_id, action)
        return SandboxFiles(record.link, ready=ready)

    @functools.cached_property
    def _exporter(self) -> Exporter:
        return Exporter(
            registry=self.registry,
            runtimes=self.runtimes,
            access=self._access,
            commands=self._commands,
            files=self.files,
            fork=self._fork_one,
            end=self.terminate,
        )

    async def export_changes(self, sandbox_id: str, dest: Path) -> None:
        """Copy what the sandbox changed, as an image layer, into the empty directory `dest`."""
        await self._exporter.export_changes(sandbox_id, dest)

    def layers_in_use(self) -> set[str]:
        """Keys of the built layers that live sandboxes stack (never to be pruned)."""
        return self.registry.layers_in_use(self.images.built.layers_dir)

    # -- pools -------------------------------------------------------------------------------------

    def configure_pool(self, name: str, template: SandboxSpec, size: int) -> dict[str, Any]:
        """Keep `size` idle sandboxes like `template` started for `create` to claim."""
        self._require_started()
        return self._pools.configure(name, template, size)

    def remove_pool(self, name: str) -> None:
        """Stop pool `name` and end its idle sandboxes."""
        self.pools.remove(name)

    def list_pools(self) -> list[dict[str, Any]]:
        """Every pool with its template, target size, idle count, hits and misses."""
        return [pool.to_dict() for pool in self.pools.list()]

    # -- volumes -----------------------------------------------------------------------------------

    async def create_volume(self, size_mb: int = DEFAULT_VOLUME_SIZE_MB) -> VolumeInfo:
        """A new, empty volume of `size_mb` MiB (its quota), for sandboxes to mount."""
        self._require_started()
        return await self.volumes.create(size_mb)

    async def volume(self, volume_id: str) -> VolumeInfo:
        """Size, usage and the live sandboxes mounting a volume (`VolumeNotFound` if none)."""
        return await self.volumes.info(volume_id)

    async def delete_volume(self, volume_id: str) -> None:
        """Delete a volume and its files; `VolumeInUse` while live sandboxes mount it."""
        self._require_started()
        await self.volumes.delete(volume_id)


def _keepable(record: SandboxRecord) -> bool:
    """Whether a closing engine may leave the sandbox running for the next one."""
    if record.state is SandboxState.CREATING or record.ending or record.pooled:
        return False
    return record.state is SandboxState.HIBERNATED or not record.exited.is_set()
