"""The engine: the per-node owner of sandboxes.

It validates requests, turns them into plans, asks a runtime to run them, talks to each
sandbox's guest agent, enforces lifetimes, and records why every sandbox ended. Sandboxes do not
depend on the engine's process: `close(keep_sandboxes=True)` (or a crash) leaves them running,
and the next engine on the same data directory adopts them from their records on disk.

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
import dataclasses
import fcntl
import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any

from corral import fsdiff, network, oci, userns
from corral.agent import protocol as P
from corral.agentlink import unwrap
from corral.errors import (
    AgentUnavailable,
    Conflict,
    CorralError,
    InvalidRequest,
    InvalidState,
    PayloadTooLarge,
    RuntimeUnavailable,
    SandboxEnded,
    SandboxFailed,
    SandboxNotFound,
)
from corral.files import SandboxFiles
from corral.ids import check_id, new_id
from corral.images import ImageStore, Progress, RootImage
from corral.layers import export_changes
from corral.models import ExecResult, ProcessInfo, SandboxInfo, StateChange
from corral.plan import Bind, PlanLimits, PlanNetwork, PlanVolume, SandboxPlan
from corral.pools import POOL_FIELDS, Pools
from corral.process import Process
from corral.runtimes import PREFERENCE, Launch, Runtime, make_runtime
from corral.runtimes.base import cgroup_for, process_start_time, read_runtime_log
from corral.sandbox import RECORD_NAME, Sandbox
from corral.snapshots import SnapshotInfo, SnapshotStore
from corral.spec import MAX_TIMEOUT, SandboxSpec, check_env, check_sandbox_path
from corral.state import EndReason, SandboxState, parse_state
from corral.volumes import DEFAULT_SIZE_MB, VolumeInfo, VolumeStore

log = logging.getLogger("corral.engine")

MiB = 1024 * 1024
DEFAULT_WORKDIR = "/root"
CHECKPOINT_DIR = "checkpoint"  # in a hibernated sandbox's directory: its memory and files
MAX_TTL = 30 * 24 * 3600.0  # of a snapshot
MAX_FORK = 64
MAX_LISTING = 64 * MiB  # a sandbox's list of its files, for snapshot_filesystem (gvisor)
PACK_CHANGED = ("tar", "--null", "--no-recursion", "--numeric-owner", "-C", "/", "-cf", "-")
FORK_CONCURRENCY = 3  # restores at once: 2 to 4 is fastest on 2 cores (measured)
AGENT_FILES = ("guest.py", "fileops.py", "protocol.py")
ENDED_KEPT = 1000  # terminated sandboxes remembered for `get` and `list`
# CPU weights (cgroup v2 units, 100 is normal) of pooled sandboxes: low while one starts, so a
# refill yields to live work; lowest once idle, so idle ones never slow a starting one (idle
# gVisor sandboxes each use ~2% of a core for the Sentry's timers).
FILL_WEIGHT = 10
IDLE_WEIGHT = 1
# Pools refill in the gaps of live traffic: once no sandbox has been used for FILL_QUIET seconds,
# or after FILL_MAX_DEFER seconds of continuous use, so a busy server's pools still refill.
# Starting a sandbox costs ~100 ms of CPU; on a small machine a refill running beside a user's
# commands doubles their latency, which is what the pool is there to cut.
FILL_QUIET = 0.1
FILL_MAX_DEFER = 1.0

# Runtime processes this Python process started and an engine left running on
# `close(keep_sandboxes=True)`. Held here so that Python neither warns about them nor reaps them
# behind an adopting engine's back; an engine in this same process takes them back on adoption
# and so still learns their exit status.
_HANDED_OVER: dict[int, subprocess.Popen[bytes]] = {}


def lock_data_dir(data_dir: Path) -> int:
    """Take the data directory for this engine alone; the lock goes with the fd (or process).

    A second engine on the same directory would adopt the first one's sandboxes and take over
    their agents' sockets, cutting the first off from them, so it is refused instead.
    """
    fd = os.open(data_dir / "engine.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise Conflict(
            f"another Corral engine uses the data directory {data_dir} (is `corral serve` "
            "already running?); stop it, or choose another --data-dir",
            code="data_dir_in_use",
        ) from None
    return fd


class Stopwatch:
    """Seconds between consecutive marks, by the name of the stage each ends."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = now - self._last
        self._last = now


def default_data_dir() -> Path:
    """/var/lib/corral for root, else the user's data directory."""
    if os.geteuid() == 0:
        return Path("/var/lib/corral")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "corral"


class Engine:
    """Creates, runs and ends sandboxes on this machine. Use as an async context manager.

    `on_change`, if given, is called from the event loop with a sandbox's new `SandboxInfo`
    after every change of its state (adoptions that end a sandbox included); whatever it
    raises is logged, never propagated. One engine per data directory: a starting engine
    adopts every sandbox recorded there.
    """

    def __init__(
        self,
        data_dir: Path | str | None = None,
        *,
        default_runtime: str | None = None,
        runsc_path: str | None = None,
        agent_timeout: float = 30.0,
        on_change: Callable[[SandboxInfo], None] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
        self._default_runtime = default_runtime
        # CORRAL_RUNSC picks another runsc build (a path or a name on PATH).
        self._runsc_path = runsc_path or os.environ.get("CORRAL_RUNSC", "runsc")
        self._unavailable: dict[str, str | None] = {}
        self.agent_timeout = agent_timeout
        self.images = ImageStore(self.data_dir / "images")
        self.snapshots = SnapshotStore(self.data_dir / "snapshots")
        self.volumes = VolumeStore(self.data_dir / "volumes", self._volume_users)
        self._sandboxes: dict[str, Sandbox] = {}
        self._runtimes: dict[str, Runtime] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._wake_reaper = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watchers: dict[str, asyncio.Task[Any]] = {}
        self._on_change = on_change
        self._firewall_ready = False
        self._adopting = False  # volumes are released by one sweep once adoption is done
        self._started = False
        self._lock_fd: int | None = None
        self._user_creates = 0  # in flight; pools fill only while there are none
        self._no_user_creates = asyncio.Event()
        self._no_user_creates.set()
        self._last_use = 0.0  # time.monotonic() of the last operation on a sandbox
        self.pools = Pools(
            fill=self._fill_pool,
            alive=self._idle_alive,
            discard=self._discard_idle,
            quiet=self._quiet,
        )

    # -- life of the engine -----------------------------------------------------------------

    async def start(self) -> Engine:
        """Prepare the data directory, adopt the sandboxes found there, start the reaper.

        Idempotent. Sandboxes a previous engine left running (closed with `keep_sandboxes`, or
        killed) are adopted as they were; those whose runtime has died meanwhile are cleaned
        up and recorded as ended (`runtime_error`); those past their lifetime end (`timeout`).
        """
        if self._started:
            return self
        await asyncio.to_thread(self._prepare_data_dir)
        self._lock_fd = lock_data_dir(self.data_dir)
        self._started = True
        await self._adopt_all()
        self._reaper = asyncio.create_task(self._reap_expired())
        return self

    async def close(self, *, keep_sandboxes: bool = False) -> None:
        """Stop the engine: terminate every sandbox (reason: engine shutdown), or keep them.

        With `keep_sandboxes=True`, running and paused sandboxes go on running, with their
        records on disk, for the next engine on this data directory to adopt; only the
        reaper, the watchers and the agents' sockets stop (the agents re-dial by themselves).
        Sandboxes still being created are ended either way.
        """
        await self.pools.close()  # idle pooled sandboxes are never kept: pools refill
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        live = [sb for sb in self._sandboxes.values() if sb.alive]
        kept = [
            sb
            for sb in live
            if keep_sandboxes
            and sb.state is not SandboxState.CREATING
            and not sb.ending
            and (sb.state is SandboxState.HIBERNATED or not sb.exited.is_set())
        ]
        await asyncio.gather(*(self._release(sb) for sb in kept), return_exceptions=True)
        await asyncio.gather(
            *(self._end(sb, EndReason.ENGINE_SHUTDOWN) for sb in live if sb not in kept),
            return_exceptions=True,
        )
        # What is left (watchers finishing an ending, background ends) gets a moment to finish.
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=10)
        for task in list(self._tasks):
            task.cancel()
        self._started = False
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the data directory for the next engine
            self._lock_fd = None

    async def _release(self, sandbox: Sandbox) -> None:
        """Let go of a running sandbox, leaving it to a later engine (see `close`)."""
        async with sandbox.lock:  # a pause or resume in flight finishes first
            watcher = self._watchers.pop(sandbox.id, None)
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            await sandbox.link.close()
            sandbox.save()
            launch = sandbox.launch
            if launch is not None and launch.child is not None:
                _HANDED_OVER[launch.pid] = launch.child
            # Forgotten here, so that starting this engine again adopts it afresh.
            self._sandboxes.pop(sandbox.id, None)

    async def __aenter__(self) -> Engine:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _prepare_data_dir(self) -> None:
        for directory in (self.data_dir, self.data_dir / "sandboxes", self.data_dir / "agent"):
            directory.mkdir(parents=True, exist_ok=True)
            # Sandboxes run as unprivileged host uids that must reach their own directory,
            # the agent's code and the images: traverse, but never list or write.
            directory.chmod(0o711)
        for parent in self.data_dir.resolve().parents:
            if not parent.stat().st_mode & 0o001:
                raise SandboxFailed(
                    f"data directory {self.data_dir} is inside {parent}, which other users cannot "
                    "enter; sandboxes run as unprivileged users and must reach it. Choose another "
                    "data directory (default /var/lib/corral)",
                    code="bad_data_dir",
                )
        agent_dir = self.data_dir / "agent"
        agent_dir.chmod(0o755)  # Python lists a directory to import from it
        for name in AGENT_FILES:
            source = resources.files("corral.agent").joinpath(name).read_bytes()
            target = agent_dir / name
            if not target.exists() or target.read_bytes() != source:
                temp = agent_dir / f".{name}.tmp"
                temp.write_bytes(source)
                temp.chmod(0o644)
                os.replace(temp, target)
        (self.data_dir / "images").mkdir(exist_ok=True)
        (self.data_dir / "images").chmod(0o711)
        self.images.built.prepare()
        self.snapshots.load()
        self.volumes.prepare()

    # -- adoption -----------------------------------------------------------------------------

    def _read_records(self) -> list[tuple[Path, dict[str, Any]]]:
        """Every readable sandbox record in the data directory; unreadable ones are logged."""
        records = []
        for directory in sorted((self.data_dir / "sandboxes").glob("sb-*")):
            path = directory / RECORD_NAME
            try:
                record = json.loads(path.read_text())
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except FileNotFoundError:
                log.warning("sandbox directory %s has no record; left as it is", directory)
                continue
            except (OSError, ValueError) as exc:
                log.error("skipping unreadable sandbox record %s: %s", path, exc)
                continue
            records.append((path, record))
        return records

    async def _adopt_all(self) -> None:
        """Adopt every sandbox recorded in the data directory (see `start`)."""
        adopted_internet = False
        self._adopting = True  # until every record is read: see `_release_volumes`
        for path, record in await asyncio.to_thread(self._read_records):
            try:
                sandbox = await self._adopt(record)
            except Exception as exc:  # one bad record must not keep the engine from starting
                log.error(
                    "could not adopt the sandbox recorded in %s: %s", path, exc, exc_info=True
                )
                continue
            if sandbox is not None and sandbox.alive and sandbox.spec.network == "internet":
                adopted_internet = True
        self._adopting = False
        if adopted_internet:
            # The firewall lives in the kernel and survives the engine; writing it again is
            # idempotent and tells this engine it is there.
            try:
                await self._ensure_firewall()
            except CorralError as exc:
                log.error("could not reinstall the sandbox firewall: %s", exc)
        # Only now that every live sandbox is known: volumes nobody uses any more (their last
        # sandbox ended while no engine ran) are unmounted, the others stay as they are.
        try:
            await self.volumes.sweep()
        except CorralError as exc:
            log.error("could not unmount unused volumes: %s", exc)
        self._wake_reaper.set()

    async def _adopt(self, record: dict[str, Any]) -> Sandbox | None:
        """Take over the sandbox `record` describes, or record how it ended; None if known."""
        sandbox = Sandbox.from_record(record)
        if sandbox.id in self._sandboxes:
            return None
        if sandbox.plan.dir.resolve() != (self.data_dir / "sandboxes" / sandbox.id).resolve():
            raise ValueError(f"record of {sandbox.id} names another directory: {sandbox.plan.dir}")
        sandbox.on_change = self._notify
        runtime = self.runtime(sandbox.runtime)
        if sandbox.state is SandboxState.HIBERNATED:  # nothing runs: its checkpoint is on disk
            self._sandboxes[sandbox.id] = sandbox
            sandbox.exited.set()
            if not (sandbox.plan.dir / CHECKPOINT_DIR).is_dir():
                await self._end(sandbox, EndReason.RUNTIME_ERROR, "its checkpoint is missing")
            return sandbox
        pid, start_time = record.get("pid"), record.get("pid_start_time")
        handed_over = _HANDED_OVER.pop(pid, None) if isinstance(pid, int) else None
        alive = (
            sandbox.state in (SandboxState.RUNNING, SandboxState.PAUSED)
            and isinstance(pid, int)
            and isinstance(start_time, int)
            # The same process, not a later one that reuses its number.
            and await asyncio.to_thread(process_start_time, pid) == start_time
        )
        self._sandboxes[sandbox.id] = sandbox
        if not alive:
            if handed_over is not None:
                handed_over.poll()  # reap it
            sandbox.ending = True
            sandbox.exited.set()
            if sandbox.state is SandboxState.TERMINATED:
                detail = sandbox.end_detail  # ended, but its cleanup had failed: try again
            elif sandbox.state is SandboxState.CREATING:
                detail = "the engine stopped while creating the sandbox"
            else:
                detail = "the runtime exited while the engine was stopped"
                log_tail = await asyncio.to_thread(read_runtime_log, sandbox.plan)
                if log_tail:
                    detail += f": {log_tail}"
            try:
                await asyncio.to_thread(runtime.destroy, sandbox.plan)
            except Exception as exc:  # recorded below; the record is retried next start
                log.error("cleaning up %s failed: %s", sandbox.id, exc)
                detail = f"{detail or ''} (cleanup failed: {exc})".strip()
            if sandbox.state is SandboxState.TERMINATED:
                sandbox.end_detail = detail
                sandbox.save()
            else:
                sandbox.end(EndReason.RUNTIME_ERROR, detail)
            log.warning("sandbox %s ended while no engine ran: %s", sandbox.id, detail)
            return sandbox
        assert isinstance(pid, int) and isinstance(start_time, int)
        sandbox.launch = Launch(pid, child=handed_over, start_time=start_time)
        try:
            await sandbox.link.listen()  # the agent re-dials by itself
        except OSError as exc:
            self._watch_sandbox(sandbox)
            await self._end(sandbox, EndReason.RUNTIME_ERROR, f"could not listen again: {exc}")
            return sandbox
        self._watch_sandbox(sandbox)
        log.info("adopted sandbox %s (%s, %s)", sandbox.id, sandbox.runtime, sandbox.state)
        if sandbox.pooled:  # an idle pooled sandbox: nobody's yet, and pools refill themselves
            await self._end(sandbox, EndReason.ENGINE_SHUTDOWN, "idle pooled sandbox released")
            return sandbox
        if sandbox.expires_at is not None and sandbox.expires_at <= time.time():
            await self._end(sandbox, EndReason.TIMEOUT, "lifetime timeout reached")
        return sandbox

    def _notify(self, sandbox: Sandbox) -> None:
        """Tell `on_change` about a state change; its failures are logged, never raised."""
        if self._on_change is None or sandbox.pooled:
            return
        try:
            self._on_change(sandbox.info())
        except Exception:
            log.exception("the on_change callback failed for sandbox %s", sandbox.id)

    def runtime(self, name: str) -> Runtime:
        """The runtime called `name` (unknown names are a `RuntimeUnavailable` error)."""
        if name not in self._runtimes:
            self._runtimes[name] = make_runtime(name, self.data_dir, runsc=self._runsc_path)
        return self._runtimes[name]

    def unavailable_reason(self, name: str) -> str | None:
        """Why runtime `name` cannot run on this machine, or None if it can (probed once)."""
        if name not in self._unavailable:
            self._unavailable[name] = self.runtime(name).unavailable_reason()
        return self._unavailable[name]

    def check_runtime(self, name: str) -> Runtime:
        """Runtime `name` if it can run here, else a `RuntimeUnavailable` that says why."""
        runtime = self.runtime(name)
        reason = self.unavailable_reason(name)
        if reason is not None:
            raise RuntimeUnavailable(f"the {name} runtime cannot run on this machine: {reason}")
        return runtime

    @property
    def default_runtime(self) -> str:
        """The configured default, else the strongest runtime this machine can run."""
        if self._default_runtime is not None:
            return self._default_runtime
        for name in PREFERENCE:
            if self.unavailable_reason(name) is None:
                return name
        reasons = "; ".join(f"{name}: {self.unavailable_reason(name)}" for name in PREFERENCE)
        raise RuntimeUnavailable(f"no runtime can run on this machine ({reasons})")

    # -- sandboxes --------------------------------------------------------------------------

    async def create(
        self,
        spec: SandboxSpec | None = None,
        *,
        pool: bool = True,
        progress: Progress | None = None,
        snapshot: str | None = None,
    ) -> SandboxInfo:
        """Create and start a sandbox; return once its agent answers.

        A warm pool whose template matches `spec` hands over an idle sandbox instead (unless
        `pool=False`); it is indistinguishable from a new one except in speed. With
        `snapshot`, the sandbox starts from that snapshot exactly where its source was: its
        image, runtime and resources are the snapshot's; env, metadata, lifetime and the
        lifecycle options come from `spec`.
        Raises `InvalidRequest`/`RuntimeUnavailable` for a bad spec, `SandboxFailed` if the
        runtime fails; either way nothing of the sandbox is left behind.
        """
        self._require_started()
        spec = spec or SandboxSpec()
        restore_from = None
        if snapshot is not None:
            taken = self.snapshots.get(check_id(snapshot, "sn"))
            # What is fixed at start, and the volumes its processes may have open.
            fixed = {name: getattr(taken.spec, name) for name in (*POOL_FIELDS, "volumes")}
            spec = dataclasses.replace(spec, env={**taken.spec.env, **spec.env}, **fixed)
            restore_from, pool = taken.path, False
        runtime = self.check_runtime(spec.runtime or self.default_runtime)
        spec = spec.with_runtime(runtime.name)
        if "hibernate" in (spec.on_idle, spec.on_timeout) and (
            not runtime.checkpoints or spec.network == "internet"
        ):
            raise InvalidRequest(
                "on_idle/on_timeout='hibernate' needs a gvisor sandbox without internet access "
                f"(this one: {runtime.name}, network {spec.network}); use 'pause' or 'terminate'",
                code="not_supported",
            )
        for mount in spec.volumes:
            self.volumes.require(check_id(mount.volume, "vol"))
        # Volumes are mounted when a sandbox starts, so a pooled sandbox (started without
        # them) can never serve a create that has some.
        if pool and not spec.volumes:
            claimed = self.pools.claim(spec)
            if claimed is not None:
                self._last_use = time.monotonic()
                return self._claim(self._sandboxes[claimed], spec)
        self._user_creates += 1
        self._no_user_creates.clear()
        try:
            sandbox = await self._start_new(spec, runtime, progress, restore_from=restore_from)
        finally:
            self._user_creates -= 1
            if not self._user_creates:
                self._no_user_creates.set()
        sandbox.expires_at = time.time() + spec.timeout
        sandbox.move(SandboxState.RUNNING)
        self._wake_reaper.set()
        return sandbox.info()

    async def _start_new(
        self,
        spec: SandboxSpec,
        runtime: Runtime,
        progress: Progress | None,
        *,
        pooled: bool = False,
        restore_from: Path | None = None,
    ) -> Sandbox:
        """Build and start a sandbox for `spec`, up to its agent answering (still `creating`);
        from the checkpoint in `restore_from` if given."""
        stages = Stopwatch()
        image = await asyncio.to_thread(self.images.resolve, spec.image, progress)
        if spec.network == "internet":
            await self._ensure_firewall()
        stages.mark("image")
        # Planning picks a free uid range and address among registered sandboxes: register the
        # new one before the next await, so concurrent creates never pick the same.
        plan = self._plan(spec, image, cpu_weight=FILL_WEIGHT if pooled else 100)
        sandbox = Sandbox(spec, plan)
        sandbox.pooled = pooled
        sandbox.on_change = self._notify
        sandbox.timings = stages.laps
        self._sandboxes[sandbox.id] = sandbox
        stages.mark("plan")
        try:
            # Recorded before anything is built, so a later engine finds and cleans up what a
            # crash in the middle would leave.
            await asyncio.to_thread(self._make_dir_and_save, sandbox)
            stages.mark("record")
            if plan.volumes:  # registered above, so no `release` unmounts them under us
                await self.volumes.acquire(v.volume_id for v in plan.volumes)
            await asyncio.to_thread(runtime.create, plan)
            stages.mark("runtime_create")
            await sandbox.link.listen()
            if restore_from is None:
                launch = await asyncio.to_thread(runtime.start, plan)
            else:
                launch = await asyncio.to_thread(runtime.restore, plan, restore_from)
            launch.start_time = await asyncio.to_thread(process_start_time, launch.pid)
            sandbox.launch = launch
            self._watch_sandbox(sandbox)
            stages.mark("runtime_start")
            await self._wait_for_agent(sandbox)
            stages.mark("agent_ready")
        except BaseException as exc:
            self._sandboxes.pop(sandbox.id, None)
            sandbox.ending = True
            await sandbox.link.close()
            with contextlib.suppress(Exception):
                await asyncio.to_thread(runtime.destroy, plan)
            with contextlib.suppress(Exception):
                await self._release_volumes(sandbox)
            if isinstance(exc, CorralError | asyncio.CancelledError):
                raise
            raise SandboxFailed(f"could not create the sandbox: {exc}") from exc
        return sandbox

    def create_timings(self, sandbox_id: str) -> dict[str, float]:
        """Seconds each stage of the sandbox's start took (empty for adopted sandboxes)."""
        return dict(self._get(sandbox_id).timings)

    # -- warm pools -------------------------------------------------------------------------

    def configure_pool(self, name: str, template: SandboxSpec, size: int) -> dict[str, Any]:
        """Keep `size` idle sandboxes like `template` started, for `create` to claim.

        Only the fields fixed at start matter (image, runtime, cpu, memory, disk, processes,
        network); env, metadata, workdir and lifetime come from each request.
        """
        self._require_started()
        if template.volumes:
            raise InvalidRequest("a pool's sandboxes cannot mount volumes; create those directly")
        runtime = self.check_runtime(template.runtime or self.default_runtime)
        return self.pools.configure(name, template.with_runtime(runtime.name), size).to_dict()

    def remove_pool(self, name: str) -> None:
        """Stop pool `name` and end its idle sandboxes."""
        self.pools.remove(name)

    def list_pools(self) -> list[dict[str, Any]]:
        """Every pool with its template, target size, idle count, hits and misses."""
        return [pool.to_dict() for pool in self.pools.list()]

    async def _fill_pool(self, template: SandboxSpec) -> str:
        assert template.runtime is not None
        sandbox = await self._start_new(
            template, self.check_runtime(template.runtime), None, pooled=True
        )
        await asyncio.to_thread(cgroup_for(sandbox.plan).set_weight, IDLE_WEIGHT)
        sandbox.move(SandboxState.RUNNING)
        return sandbox.id

    def _claim(self, sandbox: Sandbox, spec: SandboxSpec) -> SandboxInfo:
        """Give an idle pooled sandbox to a request: its spec, a fresh history and deadline."""
        # Its plan keeps the pool's weight; the cgroup, which is what counts, gets the normal one.
        cgroup_for(sandbox.plan).set_weight(100)
        now = time.time()
        sandbox.pooled = False
        sandbox.spec = spec
        sandbox.created_at = now
        sandbox.history = [
            StateChange(SandboxState.CREATING, now),
            StateChange(SandboxState.RUNNING, now),
        ]
        sandbox.expires_at = now + spec.timeout
        sandbox.touch()  # its idle time starts now, not when the pool started it
        sandbox.save()
        self._wake_reaper.set()
        return sandbox.info()

    def _idle_alive(self, sandbox_id: str) -> bool:
        sandbox = self._sandboxes.get(sandbox_id)
        return (
            sandbox is not None
            and sandbox.pooled
            and sandbox.state is SandboxState.RUNNING
            and not sandbox.ending
            and sandbox.link.connected
        )

    async def _discard_idle(self, sandbox_id: str) -> None:
        sandbox = self._sandboxes.get(sandbox_id)
        if sandbox is not None:
            await self._end(sandbox, EndReason.ENGINE_SHUTDOWN, "idle pooled sandbox released")

    @staticmethod
    def _make_dir_and_save(sandbox: Sandbox) -> None:
        sandbox.plan.dir.mkdir(mode=0o711, parents=True, exist_ok=True)
        sandbox.save()

    def _plan(
        self,
        spec: SandboxSpec,
        image: RootImage,
        *,
        cpu_weight: int = 100,
    ) -> SandboxPlan:
        runtime = spec.runtime
        assert runtime is not None  # `create` names it before planning
        sandbox_id = new_id("sb")
        live = [sb for sb in self._sandboxes.values() if sb.alive]
        net = PlanNetwork(spec.network)
        if spec.network == "internet":
            used = {sb.plan.network.index for sb in live}
            free = next((i for i in range(network.POOL_SIZE) if i not in used), None)
            if free is None:
                raise SandboxFailed("no free address for another internet sandbox", code="capacity")
            net = PlanNetwork("internet", free, network.nameservers())
        return SandboxPlan(
            sandbox_id=sandbox_id,
            runtime=runtime,
            directory=str(self.data_dir / "sandboxes" / sandbox_id),
            layers=tuple(str(layer) for layer in image.layers),
            binds=tuple(Bind(str(b.source), b.target) for b in image.binds),
            env=dict(image.env),  # the image's defaults; each command adds its spec's env
            workdir=image.workdir or DEFAULT_WORKDIR,
            limits=PlanLimits(
                cpu=spec.cpu,
                memory_bytes=spec.memory_mb * MiB,
                disk_bytes=spec.disk_mb * MiB,
                max_processes=spec.max_processes,
                tmp_bytes=min(spec.disk_mb, spec.memory_mb // 2) * MiB,
                cpu_weight=cpu_weight,
            ),
            network=net,
            uid_slot=userns.pick_slot({sb.plan.uid_slot for sb in live}),
            agent_dir=str(self.data_dir / "agent"),
            hostname=sandbox_id,
            volumes=tuple(
                PlanVolume(m.volume, str(self.volumes.mountpoint(m.volume)), m.path, m.read_only)
                for m in spec.volumes
            ),
        )

    async def _ensure_firewall(self) -> None:
        if not self._firewall_ready:
            await asyncio.to_thread(network.install_firewall, network.nameservers())
            self._firewall_ready = True

    async def _wait_for_agent(self, sandbox: Sandbox) -> None:
        connected = asyncio.ensure_future(sandbox.link.wait_connected(self.agent_timeout))
        exited = asyncio.ensure_future(sandbox.exited.wait())
        try:
            await asyncio.wait({connected, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
        if connected.done():
            connected.result()  # raises AgentUnavailable on timeout
            return
        connected.cancel()
        raise SandboxFailed(
            f"the {sandbox.runtime} runtime exited while starting the sandbox"
            + (f": {sandbox.end_detail}" if sandbox.end_detail else ""),
            code="runtime_failed",
        )

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _watch_sandbox(self, sandbox: Sandbox) -> None:
        self._watchers[sandbox.id] = self._spawn(self._watch(sandbox))

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        for sandbox_id, watcher in list(self._watchers.items()):
            if watcher is task:
                del self._watchers[sandbox_id]
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    async def _watch(self, sandbox: Sandbox) -> None:
        """Wait for the sandbox's main process to exit; then record why and clean up.

        Works for processes an earlier engine started too (pidfds need no parenthood), but
        only a child of this process has an exit status to read.
        """
        launch = sandbox.launch
        assert launch is not None
        loop = asyncio.get_running_loop()
        try:
            pidfd = os.pidfd_open(launch.pid)
        except ProcessLookupError:
            pidfd = -1
        reused = (
            launch.start_time is not None and process_start_time(launch.pid) != launch.start_time
        )
        if pidfd >= 0 and reused:  # it has exited (its number may already be another's)
            os.close(pidfd)
            pidfd = -1
        if pidfd >= 0:
            gone = loop.create_future()
            loop.add_reader(pidfd, lambda: None if gone.done() else gone.set_result(None))
            try:
                await gone
            finally:
                loop.remove_reader(pidfd)
                os.close(pidfd)
        if launch.child is not None:
            sandbox.exit_status = launch.child.wait()
        if sandbox.suspending:  # hibernating: the runtime stops by design
            sandbox.exited.set()
            return
        detail = await asyncio.to_thread(read_runtime_log, sandbox.plan)
        sandbox.end_detail = detail or None
        sandbox.exited.set()
        if sandbox.state is SandboxState.CREATING:
            return  # `create` reports the failure itself
        if sandbox.ending or not sandbox.alive:
            return
        runtime = self.runtime(sandbox.runtime)
        oom = await asyncio.to_thread(runtime.oom_kills, sandbox.plan)
        if sandbox.exit_status == 0:
            reason = EndReason.EXITED
        elif oom:
            reason = EndReason.OUT_OF_MEMORY
        else:
            reason = EndReason.RUNTIME_ERROR
        status = sandbox.exit_status
        await self._end(
            sandbox,
            reason,
            detail or (f"exit status {status}" if status is not None else "exit status unknown"),
        )

    async def _end(self, sandbox: Sandbox, reason: EndReason, detail: str | None = None) -> None:
        """Stop `sandbox` for `reason` and release everything it holds. Idempotent."""
        async with sandbox.lock:
            if not sandbox.alive:
                return
            sandbox.ending = True
            await sandbox.link.close()
            try:
                await asyncio.to_thread(self.runtime(sandbox.runtime).destroy, sandbox.plan)
            except CorralError as exc:
                log.error("cleaning up %s failed: %s", sandbox.id, exc)
                detail = f"{detail or ''} (cleanup failed: {exc.message})".strip()
            sandbox.end(reason, detail)
            self._forget_old()
        await self._release_volumes(sandbox)
        # The watcher reaps the runtime's process once it has gone; let it finish.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(sandbox.exited.wait(), 10)

    def _forget_old(self) -> None:
        ended = [sb for sb in self._sandboxes.values() if not sb.alive]
        for sandbox in ended[:-ENDED_KEPT]:
            del self._sandboxes[sandbox.id]

    async def _reap_expired(self) -> None:
        """Apply lifetimes and idle timeouts; wakes at the next deadline or every second."""
        while True:
            now = time.time()
            next_deadline = now + 1.0
            for sandbox in list(self._sandboxes.values()):
                if not sandbox.alive or sandbox.ending or sandbox.settling:
                    continue
                if sandbox.expires_at is not None and sandbox.expires_at <= now:
                    sandbox.settling = True
                    self._spawn(self._lifetime_over(sandbox))
                    continue
                if sandbox.expires_at is not None:
                    next_deadline = min(next_deadline, sandbox.expires_at)
                idle_at = sandbox.idle_deadline()
                if idle_at is not None:
                    if idle_at <= now:
                        sandbox.settling = True
                        self._spawn(self._idle(sandbox))
                    else:
                        next_deadline = min(next_deadline, idle_at)
            for snapshot_id in self.snapshots.expired(now):
                self._spawn(self.delete_snapshot(snapshot_id))
            self._wake_reaper.clear()
            # Not `asyncio.wait_for`: on Python 3.11 it swallows a cancellation that arrives
            # just as the event is set, and `close` would wait for the reaper forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_deadline - time.time())):
                    await self._wake_reaper.wait()

    async def _lifetime_over(self, sandbox: Sandbox) -> None:
        """The lifetime ran out: end the sandbox, or hibernate it (`on_timeout`) with a fresh
        lifetime for when it wakes."""
        try:
            if sandbox.spec.on_timeout == "hibernate":
                try:
                    await self.hibernate(sandbox.id, reason="timeout")
                    sandbox.remaining = sandbox.spec.timeout
                    sandbox.save()
                    return
                except CorralError as exc:
                    log.warning("hibernating %s at its timeout failed: %s", sandbox.id, exc)
            await self._end(sandbox, EndReason.TIMEOUT, "lifetime timeout reached")
        finally:
            sandbox.settling = False

    async def _idle(self, sandbox: Sandbox) -> None:
        """Nothing used the sandbox for its idle_timeout: pause, hibernate or end it."""
        action = sandbox.spec.on_idle
        reason = f"idle for {sandbox.spec.idle_timeout:g} s"
        try:
            if action == "terminate":
                await self._end(sandbox, EndReason.IDLE, reason)
            elif action == "hibernate":
                await self.hibernate(sandbox.id, reason="idle")
            else:
                await self.pause(sandbox.id, reason="idle")
        except CorralError as exc:  # it changed state meanwhile, or the runtime refused
            log.warning("idle %s of %s failed: %s", action, sandbox.id, exc)
            sandbox.touch()  # not again at once
        finally:
            sandbox.settling = False

    @contextlib.contextmanager
    def active(self, sandbox_id: str) -> Iterator[None]:
        """Count the sandbox as in use for as long as the block runs (an attached stream)."""
        sandbox = self._get(sandbox_id)
        sandbox.holds += 1
        sandbox.touch()
        try:
            yield
        finally:
            sandbox.holds -= 1
            sandbox.touch()

    def _require_started(self) -> None:
        if not self._started:
            raise SandboxFailed(
                "the engine is not started; use `async with Engine(...)`", code="not_started"
            )

    def _get(self, sandbox_id: str) -> Sandbox:
        check_id(sandbox_id, "sb")
        sandbox = self._sandboxes.get(sandbox_id)
        if sandbox is None or sandbox.pooled:  # idle pooled sandboxes are nobody's to see
            raise SandboxNotFound(f"no sandbox {sandbox_id}")
        return sandbox

    def _running(self, sandbox_id: str, action: str) -> Sandbox:
        sandbox = self._get(sandbox_id)
        sandbox.require(action, SandboxState.RUNNING)
        if sandbox.ending:
            sandbox.require(action)  # it is on its way out: no state allows the action
        self._last_use = time.monotonic()
        sandbox.touch()
        return sandbox

    async def _quiet(self) -> None:
        """Return when a pool may start a sandbox: no create in flight, a gap in use."""
        give_up = time.monotonic() + FILL_MAX_DEFER
        while True:
            await self._no_user_creates.wait()
            now = time.monotonic()
            wait = min(self._last_use + FILL_QUIET, give_up) - now
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    def get(self, sandbox_id: str) -> SandboxInfo:
        """What is known about a sandbox, ended ones included (the last 1000)."""
        return self._get(sandbox_id).info()

    def list_sandboxes(
        self, *, state: SandboxState | str | None = None, metadata: Mapping[str, str] | None = None
    ) -> list[SandboxInfo]:
        """Sandboxes in creation order, optionally only those in `state` whose metadata match."""
        if state is not None:
            state = parse_state(state)
        found = []
        for sandbox in self._sandboxes.values():
            if sandbox.pooled or (state is not None and sandbox.state is not state):
                continue
            if metadata and any(sandbox.spec.metadata.get(k) != v for k, v in metadata.items()):
                continue
            found.append(sandbox.info())
        return found

    async def terminate(self, sandbox_id: str) -> SandboxInfo:
        """End a sandbox now (reason: terminated by user). Ending an ended sandbox is a no-op."""
        sandbox = self._get(sandbox_id)
        await self._end(sandbox, EndReason.USER, "terminated by request")
        return sandbox.info()

    async def pause(self, sandbox_id: str, *, reason: str | None = None) -> SandboxInfo:
        """Freeze every process of a running sandbox: memory stays, CPU use and the lifetime
        stop. Any use resumes it (unless its spec says `auto_resume=False`)."""
        sandbox = self._get(sandbox_id)
        async with sandbox.lock:
            sandbox.require("pause", SandboxState.RUNNING)
            await asyncio.to_thread(self.runtime(sandbox.runtime).pause, sandbox.plan)
            sandbox.move(SandboxState.PAUSED, reason)
        return sandbox.info()

    async def resume(self, sandbox_id: str) -> SandboxInfo:
        """Thaw a paused sandbox (`wake` is for a hibernated one)."""
        sandbox = self._get(sandbox_id)
        async with sandbox.lock:
            sandbox.require("resume", SandboxState.PAUSED)
            await asyncio.to_thread(self.runtime(sandbox.runtime).resume, sandbox.plan)
            sandbox.move(SandboxState.RUNNING)
        return sandbox.info()

    async def hibernate(self, sandbox_id: str, *, reason: str | None = None) -> SandboxInfo:
        """Write a sandbox's memory and files to disk and stop it; `wake` (or any use) restores
        it exactly: processes, open files, listeners, working directories.

        A hibernated sandbox holds no memory and no CPU, its lifetime stops, and it survives a
        restart of the engine. gvisor only (its checkpoints keep memory; CRIU, which the
        namespaces runtime would need, does not work on this class of kernel), and not for
        internet sandboxes, which this runsc cannot checkpoint. Streams open to the sandbox
        (exec output, file transfers) end; the processes behind them go on.
        """
        sandbox = self._get(sandbox_id)
        runtime = self._checkpointing(sandbox, "hibernate")
        plan = sandbox.plan
        failure: CorralError | None = None
        async with sandbox.lock:
            sandbox.require("hibernate", SandboxState.RUNNING, SandboxState.PAUSED)
            if sandbox.ending:
                sandbox.require("hibernate")
            if sandbox.state is SandboxState.PAUSED:  # runsc checkpoints a running sandbox
                await asyncio.to_thread(runtime.resume, plan)
                sandbox.move(SandboxState.RUNNING, "resumed to hibernate")
            sandbox.suspending = True
            try:
                await sandbox.link.quiesce()
                await asyncio.to_thread(runtime.checkpoint, plan, plan.dir / CHECKPOINT_DIR)
            except CorralError as exc:
                sandbox.suspending = False
                failure = exc
                with contextlib.suppress(OSError):
                    await sandbox.link.listen()  # the agent dials back; the sandbox goes on
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(sandbox.exited.wait(), 10)
                sandbox.launch = None
                sandbox.forgetting = self._spawn(asyncio.to_thread(runtime.forget, plan))
                sandbox.move(SandboxState.HIBERNATED, reason)
        if failure is not None:
            if sandbox.exited.is_set():  # runsc kills a sandbox it fails to checkpoint
                await self._end(sandbox, EndReason.RUNTIME_ERROR, f"hibernating failed: {failure}")
            raise failure
        return sandbox.info()

    async def wake(self, sandbox_id: str) -> SandboxInfo:
        """Restore a hibernated sandbox where it was; returns once its agent answers."""
        sandbox = self._get(sandbox_id)
        runtime = self.runtime(sandbox.runtime)
        plan = sandbox.plan
        async with sandbox.lock:
            sandbox.require("wake", SandboxState.HIBERNATED)
            if sandbox.forgetting is not None:
                await asyncio.wait({sandbox.forgetting})
            else:  # hibernated by an earlier engine, which may have stopped before this
                await asyncio.to_thread(runtime.forget, plan)
            sandbox.forgetting = None
            sandbox.exited = asyncio.Event()
            await sandbox.link.listen()
            try:
                launch = await asyncio.to_thread(runtime.restore, plan, plan.dir / CHECKPOINT_DIR)
                launch.start_time = await asyncio.to_thread(process_start_time, launch.pid)
            except CorralError:
                await sandbox.link.close()
                raise
            sandbox.launch = launch
            sandbox.suspending = False
            self._watch_sandbox(sandbox)
            await self._wait_for_agent(sandbox)
            sandbox.move(SandboxState.RUNNING)
            # The image is stale from the first write on: never restore it twice.
            await asyncio.to_thread(shutil.rmtree, plan.dir / CHECKPOINT_DIR, True)
        self._wake_reaper.set()
        return sandbox.info()

    async def snapshot(
        self,
        sandbox_id: str,
        *,
        ttl: float | None = None,
        name: str | None = None,
        owner: str | None = None,
    ) -> SnapshotInfo:
        """Save the sandbox's memory and files as a snapshot; the sandbox goes on running.

        `create(snapshot=...)` starts new sandboxes from it, each where this one was now.
        gvisor sandboxes without internet access only, as for `hibernate`. `ttl` seconds
        later the snapshot is deleted. Streams open to the sandbox end; its processes do not.
        """
        sandbox = self._get(sandbox_id)
        runtime = self._checkpointing(sandbox, "snapshot")
        if ttl is not None and (
            isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 1 <= ttl <= MAX_TTL
        ):
            raise InvalidRequest(f"ttl must be 1 to {MAX_TTL:g} seconds (30 days), or none")
        plan = sandbox.plan
        async with sandbox.lock:
            sandbox.require("snapshot", SandboxState.RUNNING, SandboxState.PAUSED)
            if sandbox.ending:
                sandbox.require("snapshot")
            paused = sandbox.state is SandboxState.PAUSED
            with self.snapshots.writing() as (snapshot_id, temp):
                if paused:  # runsc checkpoints a running sandbox
                    await asyncio.to_thread(runtime.resume, plan)
                try:
                    await sandbox.link.quiesce()
                    await asyncio.to_thread(runtime.checkpoint, plan, temp, leave_running=True)
                finally:
                    with contextlib.suppress(OSError):
                        await sandbox.link.listen()  # the agent dials back
                    if paused:
                        await asyncio.to_thread(runtime.pause, plan)
                now = time.time()
                info = SnapshotInfo(
                    id=snapshot_id,
                    sandbox_id=sandbox.id,
                    runtime=sandbox.runtime,
                    image=sandbox.spec.image,
                    created_at=now,
                    expires_at=now + ttl if ttl is not None else None,
                    size_bytes=0,
                    name=name,
                    owner=owner,
                )
                taken = await asyncio.to_thread(self.snapshots.commit, temp, info, sandbox.spec)
        sandbox.touch()
        return taken.info

    def list_snapshots(self) -> list[SnapshotInfo]:
        return [snapshot.info for snapshot in self.snapshots.all()]

    def get_snapshot(self, snapshot_id: str) -> SnapshotInfo:
        return self.snapshots.get(check_id(snapshot_id, "sn")).info

    async def delete_snapshot(self, snapshot_id: str) -> None:
        check_id(snapshot_id, "sn")
        await asyncio.to_thread(self.snapshots.delete, snapshot_id)

    async def fork(self, sandbox_id: str, count: int) -> list[SandboxInfo]:
        """`count` new sandboxes with this one's memory and files, diverging from now on.

        A snapshot taken for the purpose and deleted after; the copies start a few at a time.
        All or nothing: if one fails, the others are ended and the error is raised.
        """
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_FORK:
            raise InvalidRequest(f"count must be 1 to {MAX_FORK}")
        spec = self._get(sandbox_id).spec
        taken = await self.snapshot(sandbox_id)
        gate = asyncio.Semaphore(FORK_CONCURRENCY)

        async def one() -> SandboxInfo:
            async with gate:
                return await self.create(spec, snapshot=taken.id)

        try:
            made = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
        finally:
            await self.delete_snapshot(taken.id)
        failed = [r for r in made if isinstance(r, BaseException)]
        if failed:
            ok = [r for r in made if isinstance(r, SandboxInfo)]
            await asyncio.gather(*(self.terminate(i.id) for i in ok), return_exceptions=True)
            raise failed[0]
        return [r for r in made if isinstance(r, SandboxInfo)]

    def _checkpointing(self, sandbox: Sandbox, action: str) -> Runtime:
        """The sandbox's runtime, if it can checkpoint this sandbox; else a clear refusal."""
        runtime = self.runtime(sandbox.runtime)
        if not runtime.checkpoints:
            raise InvalidRequest(
                f"sandbox {sandbox.id} runs under {runtime.name}, which cannot save memory: "
                f"{action} needs a gvisor sandbox (pause works under every runtime)",
                code="not_supported",
            )
        if sandbox.plan.network.policy == "internet":
            raise InvalidRequest(
                f"sandbox {sandbox.id} has internet access, which runsc cannot checkpoint; "
                f"create it with network='none' to {action} it",
                code="not_supported",
            )
        return runtime

    async def _use(self, sandbox_id: str, action: str) -> Sandbox:
        """The running sandbox `sandbox_id`, resumed or woken first if it sleeps and may."""
        sandbox = self._get(sandbox_id)
        if sandbox.spec.auto_resume and not sandbox.ending:
            with contextlib.suppress(InvalidState):  # someone else woke it meanwhile
                if sandbox.state is SandboxState.PAUSED:
                    await self.resume(sandbox_id)
                elif sandbox.state is SandboxState.HIBERNATED:
                    await self.wake(sandbox_id)
        return self._running(sandbox_id, action)

    async def set_timeout(self, sandbox_id: str, seconds: float) -> SandboxInfo:
        """Make the sandbox end `seconds` from now (at most 24 h)."""
        sandbox = self._get(sandbox_id)
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, int | float)
            or not 1 <= seconds <= MAX_TIMEOUT
        ):
            raise InvalidRequest(
                f"timeout must be 1 to {MAX_TIMEOUT:g} seconds (24 h), got {seconds!r}"
            )
        sandbox.require(
            "set the timeout of",
            SandboxState.RUNNING,
            SandboxState.PAUSED,
            SandboxState.HIBERNATED,
        )
        if sandbox.state is SandboxState.RUNNING:
            sandbox.expires_at = time.time() + float(seconds)
        else:  # the lifetime counts only while running
            sandbox.remaining = float(seconds)
        sandbox.save()
        self._wake_reaper.set()
        return sandbox.info()

    # -- processes --------------------------------------------------------------------------

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
        sandbox = await self._use(sandbox_id, "run a command in")
        params: dict[str, Any] = {"stdin": bool(stdin)}
        if (argv is None) == (cmd is None):
            raise InvalidRequest("give either argv (a list of strings) or cmd (a shell string)")
        if argv is not None:
            if (
                isinstance(argv, str | bytes)
                or not argv
                or not all(isinstance(a, str) for a in argv)
            ):
                raise InvalidRequest("argv must be a non-empty list of strings")
            if any("\0" in a for a in argv):
                raise InvalidRequest("argv must not contain NUL bytes")
            params["argv"] = list(argv)
        else:
            if not isinstance(cmd, str) or not cmd.strip() or "\0" in cmd:
                raise InvalidRequest("cmd must be a non-empty shell command without NUL bytes")
            params["cmd"] = cmd
        # The sandbox's own env and workdir come from its spec on every command (not only from
        # the agent's start), so a sandbox claimed from a warm pool gets the request's.
        if env is not None:
            check_env(env)
        merged = {**sandbox.plan.env, **sandbox.spec.env, **(env or {})}
        if merged:
            params["env"] = check_env(merged)
        if cwd is not None:
            params["cwd"] = check_sandbox_path(cwd, "cwd")
        else:
            params["cwd"] = sandbox.spec.workdir or sandbox.plan.workdir
        if user is not None:
            if not isinstance(user, str | int) or isinstance(user, bool):
                raise InvalidRequest("user must be a user name or a numeric uid")
            params["user"] = user
        if pty is not None:
            rows, cols = pty
            if not (0 < rows < 10000 and 0 < cols < 10000):
                raise InvalidRequest("pty rows and cols must be between 1 and 9999")
            params["pty"] = {"rows": rows, "cols": cols}
        if timeout is not None:
            if (
                isinstance(timeout, bool)
                or not isinstance(timeout, int | float)
                or not 0 < timeout <= MAX_TIMEOUT
            ):
                raise InvalidRequest(
                    f"timeout must be 0 to {MAX_TIMEOUT:g} seconds, got {timeout!r}"
                )
            params["timeout"] = float(timeout)
        if tag is not None:
            params["tag"] = str(tag)[:256]
        runtime = self.runtime(sandbox.runtime)
        ooms_before = runtime.oom_kills(sandbox.plan)  # one small cgroup file read
        try:
            channel = await sandbox.link.open(P.PROC_START, params)
            kind, payload = await channel.receive()
            if kind == P.REPLY:
                unwrap(payload)
                raise SandboxFailed("the guest agent ended the process before starting it")
        except AgentUnavailable as exc:
            if sandbox.ending or not sandbox.alive:  # ended under us: say so, with the reason
                raise await self._explain_loss(sandbox, exc) from exc
            raise
        if kind != P.EVENT or payload.get("type") != "started":
            raise SandboxFailed(f"unexpected first frame from the guest agent: {kind}")

        def oom_check() -> bool:
            return runtime.oom_kills(sandbox.plan) > ooms_before

        async def explain_loss(error: AgentUnavailable) -> CorralError:
            return await self._explain_loss(sandbox, error)

        return Process(sandbox.link, channel, payload, oom_check, explain_loss)

    async def _explain_loss(self, sandbox: Sandbox, error: AgentUnavailable) -> CorralError:
        """When the agent's connection drops because the sandbox ended, say so and why."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(sandbox.exited.wait(), 5)
        for _ in range(100):  # the watcher records the end right after the exit
            if not sandbox.alive:
                reason = sandbox.end_reason.value if sandbox.end_reason else "unknown"
                return SandboxEnded(f"sandbox {sandbox.id} ended ({reason}) during the command")
            await asyncio.sleep(0.05)
        return error

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
        if isinstance(cmd, str):
            process = await self.exec(
                sandbox_id,
                cmd=cmd,
                env=env,
                cwd=cwd,
                user=user,
                timeout=timeout,
                stdin=stdin is not None,
            )
        else:
            process = await self.exec(
                sandbox_id,
                list(cmd),
                env=env,
                cwd=cwd,
                user=user,
                timeout=timeout,
                stdin=stdin is not None,
            )
        if stdin is not None:
            await process.write_stdin(stdin)
            await process.close_stdin()
        return await process.wait()

    async def processes(self, sandbox_id: str) -> list[ProcessInfo]:
        """Processes the agent started in this sandbox (running and recently ended)."""
        sandbox = await self._use(sandbox_id, "list the processes of")
        return [ProcessInfo.from_guest(p) for p in await sandbox.link.call(P.PROC_LIST, {})]

    async def signal(
        self, sandbox_id: str, process_id: int, sig: int | str = signal.SIGTERM
    ) -> None:
        """Send a signal to a process (and its group) by its id."""
        sandbox = await self._use(sandbox_id, "signal a process in")
        name = sig.name if isinstance(sig, signal.Signals) else sig
        await sandbox.link.call(P.PROC_SIGNAL, {"id": process_id, "signal": name})

    # -- images -----------------------------------------------------------------------------

    async def export_changes(self, sandbox_id: str, dest: Path) -> None:
        """Copy what the sandbox changed in its filesystem into the empty directory `dest`,
        as an image layer (see `corral.layers`), from one consistent moment.

        namespaces: the sandbox is frozen while its writable layer (a host directory) is
        copied. gvisor: a fork of the sandbox is listed and compared with the image (see
        `corral.fsdiff`); the sandbox itself is not disturbed.
        """
        sandbox = self._running(sandbox_id, "export the files of")
        if sandbox.runtime != "namespaces":
            await self._export_by_diff(sandbox, dest)
            return
        plan = sandbox.plan
        runtime = self.runtime(sandbox.runtime)
        async with sandbox.lock:  # frozen while copied: one consistent moment of its files
            await asyncio.to_thread(runtime.pause, plan)
            try:
                await asyncio.to_thread(
                    export_changes,
                    plan.disk_dir / "upper",
                    dest,
                    userns.host_uid(plan.uid_slot),
                    userns.RANGE,
                )
            finally:
                await asyncio.to_thread(runtime.resume, plan)

    async def _export_by_diff(self, sandbox: Sandbox, dest: Path) -> None:
        self._checkpointing(sandbox, "export the files of")
        copy = (await self.fork(sandbox.id, 1))[0]  # a still picture of this moment
        archive = dest.with_name(f"{dest.name}.tar")
        try:
            # Stop every process of the copy but its agent (pid 1), so nothing writes while
            # it is listed and packed.
            await self.run(copy.id, "kill -STOP -1 2>/dev/null; true")
            # What the copy prints is the sandbox's to choose: bounded, in memory and on disk.
            listed = bytearray()
            listing = await self.exec(copy.id, ["sh", "-c", fsdiff.LISTING], timeout=600)
            async for stream, data in listing.output():
                if stream == "stdout":
                    listed += data
                    _within(len(listed), MAX_LISTING, "its list of files")
            if (await listing.wait()).exit_code != 0:
                raise SandboxFailed("listing the sandbox's files failed (it needs GNU find)")
            guest, mounts = fsdiff.parse_listing(bytes(listed))
            plan = self._get(copy.id).plan
            bundle = json.loads((plan.dir / "bundle" / "config.json").read_text())
            lower = await asyncio.to_thread(
                fsdiff.host_listing,
                Path(bundle["root"]["path"]),
                userns.host_uid(plan.uid_slot),
                userns.RANGE,
            )
            changed, deleted = fsdiff.changes(guest, lower, mounts)
            names = "\0".join(path.lstrip("/") for path in changed)
            await self.files(copy.id).write("/tmp/.corral-changed", names)
            packing = await self.exec(
                copy.id,
                [*PACK_CHANGED, "-T", "/tmp/.corral-changed"],
            )
            written, most = 0, sandbox.plan.limits.disk_bytes + 64 * MiB
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
            await asyncio.to_thread(fsdiff.add_whiteouts, archive, deleted)
            await asyncio.to_thread(dest.rmdir)  # unpack_layer makes it, atomically
            await asyncio.to_thread(oci.unpack_layer, archive, dest)
        finally:
            archive.unlink(missing_ok=True)
            await self.terminate(copy.id)

    def layers_in_use(self) -> set[str]:
        """Keys of the built layers that live sandboxes stack (never to be pruned)."""
        layers_dir = self.images.built.layers_dir
        return {
            Path(layer).name
            for sandbox in self._sandboxes.values()
            if sandbox.alive
            for layer in sandbox.plan.layers
            if Path(layer).parent == layers_dir
        }

    # -- files ------------------------------------------------------------------------------

    def files(self, sandbox_id: str) -> SandboxFiles:
        """The file API of a running sandbox."""
        sandbox = self._get(sandbox_id)
        if not sandbox.spec.auto_resume:
            self._running(sandbox_id, "use the files of")
        return SandboxFiles(
            sandbox.link, ready=functools.partial(self._use, sandbox_id, "use the files of")
        )

    async def ping(self, sandbox_id: str) -> float:
        """Round trip to the sandbox's guest agent, in seconds."""
        sandbox = await self._use(sandbox_id, "ping")
        start = time.perf_counter()
        await sandbox.link.call(P.PING, {})
        return time.perf_counter() - start

    # -- volumes ----------------------------------------------------------------------------

    async def create_volume(self, size_mb: int = DEFAULT_SIZE_MB) -> VolumeInfo:
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

    def _volume_users(self, volume_id: str) -> list[str]:
        """Live sandboxes (being created included) that mount `volume_id`."""
        return [
            sandbox.id
            for sandbox in self._sandboxes.values()
            if sandbox.alive and any(v.volume_id == volume_id for v in sandbox.plan.volumes)
        ]

    async def _release_volumes(self, sandbox: Sandbox) -> None:
        """After `sandbox` ended: unmount its volumes from the host unless others use them.

        Not while adopting: a sandbox not yet adopted may use them (`_adopt_all` sweeps after).
        """
        if sandbox.plan.volumes and not self._adopting:
            try:
                await self.volumes.release(v.volume_id for v in sandbox.plan.volumes)
            except CorralError as exc:  # they stay mounted; the next sweep tries again
                log.error("could not unmount the volumes of %s: %s", sandbox.id, exc)


def _within(size: int, limit: int, what: str) -> None:
    """Refuse sandbox output past `limit` bytes (a sandbox could print without end)."""
    if size > limit:
        raise PayloadTooLarge(
            f"the sandbox sent more than {limit // MiB} MiB as {what}; a sandbox's changes "
            "cannot exceed its disk"
        )
