"""Keeping one deployment served: its instance (a sandbox running its command), health checks,
restarts with backoff, light sleep, logs copied out, and updates without a failed request.

The command runs with its output appended to a file in the sandbox (`spec.LOG_FILE`); a
`tail --pid` of that file, started through the agent, copies it to the host's `LogBook` and
ends when the command does. Both are plain processes, so they survive the sandbox sleeping
(hibernated or paused) and this server restarting; only the copy's stream is cut, and it is
started again from where it stopped. Checks connect to the port passively: they neither wake
the sandbox nor count as its use, so an idle deployment does sleep. A request wakes it (the
gateway's connection does count).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time

from corral.core.errors import (
    CorralError,
    DeploymentFailed,
    InvalidRequest,
    NotFound,
    PermissionDenied,
)
from corral.core.ids import new_id
from corral.core.spec import MAX_TIMEOUT
from corral.core.state import SandboxState
from corral.server.deployments.logs import LogBook
from corral.server.deployments.spec import LOG_FILE, DeploymentSpec
from corral.server.deployments.store import DeploymentEntry
from corral.server.resources.sandboxes import Sandboxes
from corral.server.service import Service
from corral.server.tenancy import Tenant

log = logging.getLogger("corral.deployments")

WATCH_EVERY = 1.0  # seconds between looks at the instance
HEALTH_EVERY = 5.0
HEALTH_FAILURES = 3  # checks failed in a row before the instance is replaced
HEALTH_TIMEOUT = 5.0
DRAIN_TIMEOUT = 30.0  # for requests to a replaced instance to finish
BACKOFF = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0)  # seconds before restart n
STABLE_AFTER = 60.0  # healthy this long, the next crash restarts at once again
EXTEND_BELOW = MAX_TIMEOUT / 2  # lifetime left below which it is extended again
APP_TAG = "corral-deployment"
COPY_TAG = "corral-deployment-logs"
RECENT = 2048  # bytes of an instance's output shown when it fails to start


@dataclasses.dataclass(eq=False)
class Instance:
    """A sandbox serving one version of the deployment."""

    sandbox_id: str
    pid: int | None  # the command's process (None: a snapshot's processes serve)
    offset: int = 0  # bytes of its log file copied to the host
    healthy_at: float = 0.0  # time.monotonic() of its first passed health check
    exit_detail: str | None = None  # how the command ended, once it has
    exited: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    recent: bytearray = dataclasses.field(default_factory=bytearray)  # its last output
    copy_broken: bool = False  # its output cannot be copied (no `tail` with --pid in it)
    copier: asyncio.Task[None] | None = None
    waiter: asyncio.Task[None] | None = None

    def stop_tasks(self) -> None:
        for task in (self.copier, self.waiter):
            if task is not None:
                task.cancel()


class Runner:
    """One deployment: the entry in the store, the instance serving it, and what happened."""

    def __init__(
        self,
        service: Service,
        entry: DeploymentEntry,
        book: LogBook,
        in_flight: collections.Counter[str],
    ) -> None:
        self.service = service
        self.in_flight = in_flight  # requests on their way, by sandbox id (the gateway's)
        self.entry = entry
        self.book = book
        self.instance: Instance | None = None
        self.status = "starting"
        self.restarts = 0
        self.ready = asyncio.Event()  # an instance is serving (set while one is)
        self._lock = asyncio.Lock()  # one change of instance at a time
        self._task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.entry.name

    # -- the loop -----------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"deployment {self.name}")

    async def stop(self) -> None:
        """Stop watching (the instance keeps running: the next server adopts it)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.instance is not None:
            self.instance.stop_tasks()

    async def _run(self) -> None:
        while True:
            try:
                await self._supervise()
            except Exception:  # a bug must not leave the deployment unwatched
                log.exception("supervising deployment %s failed; going on", self.name)
                await asyncio.sleep(WATCH_EVERY)

    async def _supervise(self) -> None:
        failed_starts = 0
        while True:
            instance = self.instance
            if instance is None:
                try:
                    async with self._lock:
                        if self.instance is None:
                            await self.serve(await self.launch(self.entry.spec))
                    failed_starts = 0
                except CorralError as error:
                    self.status = "failing"
                    failed_starts += 1
                    self.book.event("start_failed", error.message)
                    await asyncio.sleep(BACKOFF[min(failed_starts, len(BACKOFF)) - 1])
                continue
            why = await self._watch(instance)
            async with self._lock:
                if self.instance is not instance:
                    continue  # an update replaced it
                stable = instance.healthy_at and time.monotonic() - instance.healthy_at
                self.restarts += 1
                self.status = "restarting"
                self.instance = None
                self.ready.clear()
                self.book.event("crashed", f"instance {instance.sandbox_id}: {why}")
                await self._retire(instance, drain=False)
            if not stable or stable < STABLE_AFTER:
                failed_starts += 1
                await asyncio.sleep(BACKOFF[min(failed_starts, len(BACKOFF)) - 1])
            else:
                failed_starts = 0

    async def _watch(self, instance: Instance) -> str:
        """Look after a serving instance until it must be replaced; why it must."""
        engine = self.service.engine
        failures = 0
        next_check = time.monotonic() + HEALTH_EVERY
        while self.instance is instance:
            try:
                info = engine.get(instance.sandbox_id)
            except NotFound:
                return "its sandbox is gone"
            if info.state is SandboxState.TERMINATED:
                reason = info.end_reason.value if info.end_reason else "ended"
                return f"its sandbox ended ({reason}: {info.end_detail or 'no detail'})"
            if instance.exited.is_set():
                return f"the command {instance.exit_detail or 'ended'}"
            if info.state is SandboxState.RUNNING:
                self.status = "running"
                self._copy_logs(instance)
                await self._extend(instance.sandbox_id, info.expires_at)
                if time.monotonic() >= next_check:
                    why = await self._unhealthy(instance.sandbox_id, self.entry.spec)
                    failures = failures + 1 if why else 0
                    if failures >= HEALTH_FAILURES:
                        return f"its health check failed {failures} times in a row ({why})"
                    next_check = time.monotonic() + HEALTH_EVERY
            elif info.state in (SandboxState.PAUSED, SandboxState.HIBERNATED):
                if self.status != "sleeping":
                    self.book.event("slept", f"instance {instance.sandbox_id} {info.state.value}")
                self.status = "sleeping"
                failures = 0
            await asyncio.sleep(WATCH_EVERY)
        return ""

    # -- instances ----------------------------------------------------------------------------

    async def launch(self, spec: DeploymentSpec) -> Instance:
        """A new instance of `spec`, answering its health check; `DeploymentFailed` (with the
        end of its output) if it does not within its start_timeout, and nothing is left of it."""
        engine = self.service.engine
        key = await self.service.store.find_key(self.entry.owner)
        if not key.active:
            raise PermissionDenied(f"the API key that owns deployment {self.name} is revoked")
        tenant = Tenant(self.service, key)
        sandbox = spec.sandbox_spec(image=spec.image or "debian", on_idle=self._on_idle(spec))
        info = await Sandboxes(tenant).create(sandbox, pool=False, snapshot=spec.snapshot)
        instance = Instance(info.id, None)
        try:
            argv = spec.argv()
            if argv is not None:
                process = await engine.exec(info.id, argv, tag=APP_TAG)
                instance.pid = process.pid

                async def wait() -> None:
                    with contextlib.suppress(CorralError):
                        result = await process.wait()
                        instance.exit_detail = _ended(result.exit_code, result.oom_killed)
                        instance.exited.set()

                instance.waiter = asyncio.create_task(wait())
            self._copy_logs(instance)
            await self._until_healthy(instance, spec)
        except BaseException:
            instance.stop_tasks()
            with contextlib.suppress(CorralError):
                await engine.terminate(info.id)
            raise
        instance.healthy_at = time.monotonic()
        return instance

    async def _until_healthy(self, instance: Instance, spec: DeploymentSpec) -> None:
        deadline = time.monotonic() + spec.start_timeout
        why: str | None = "not checked yet"
        while time.monotonic() < deadline:
            if instance.exited.is_set():
                why = f"the command {instance.exit_detail} before port {spec.port} answered"
                break
            why = await self._unhealthy(instance.sandbox_id, spec)
            if why is None:
                return
            await asyncio.sleep(0.2)
        else:
            waited = f"{spec.start_timeout:g} s"
            why = f"port {spec.port} did not pass its health check in {waited} ({why})"
        if instance.copier is not None:  # the last of its output (the copy ends with it)
            await asyncio.wait([instance.copier], timeout=2)
        output = bytes(instance.recent).decode(errors="replace")
        said = f"; its last output:\n{output}" if output else " (it wrote nothing)"
        raise DeploymentFailed(f"deployment {spec.name} did not start: {why}{said}")

    async def serve(self, instance: Instance) -> None:
        """Make `instance` the one serving traffic, and say so in the store."""
        self.instance = instance
        self.status = "running"
        self.ready.set()
        self.entry = dataclasses.replace(
            self.entry, instance=instance.sandbox_id, pid=instance.pid, updated_at=time.time()
        )
        await self.service.store.deployments.save(self.entry)
        self.book.event(
            "serving", f"version {self.entry.version} serves from {instance.sandbox_id}"
        )

    async def _retire(self, instance: Instance, *, drain: bool) -> None:
        """End a replaced instance, once requests already sent to it are answered (`drain`)."""
        instance.stop_tasks()
        if drain:
            deadline = time.monotonic() + DRAIN_TIMEOUT
            while self.in_flight[instance.sandbox_id] and time.monotonic() < deadline:  # noqa: ASYNC110 - a counter the gateway keeps
                await asyncio.sleep(0.05)
        with contextlib.suppress(CorralError):
            await self.service.engine.terminate(instance.sandbox_id)

    def adopt(self) -> None:
        """After a restart: the instance the store names, if its sandbox lives on."""
        sandbox_id = self.entry.instance
        if sandbox_id is None:
            return
        try:
            state = self.service.engine.get(sandbox_id).state
        except NotFound:
            return
        if state is not SandboxState.TERMINATED:
            instance = Instance(sandbox_id, self.entry.pid, offset=self.book.offset(sandbox_id))
            instance.healthy_at = time.monotonic()
            self.instance = instance
            self.ready.set()

    async def update(self, spec: DeploymentSpec) -> None:
        """Start `spec` as a new version, switch traffic once it is healthy, then retire the
        old instance after its requests finish. If the new one fails, the old one serves on."""
        async with self._lock:
            instance = await self.launch(spec)
            old = self.instance
            self.entry = dataclasses.replace(self.entry, spec=spec, version=self.entry.version + 1)
            await self.serve(instance)
            if old is not None:
                await self._retire(old, drain=True)

    async def delete(self) -> None:
        await self.stop()
        async with self._lock:
            if self.instance is not None:
                await self._retire(self.instance, drain=False)
            self.instance = None
            self.ready.clear()

    # -- checks and copies --------------------------------------------------------------------

    async def _unhealthy(self, sandbox_id: str, spec: DeploymentSpec) -> str | None:
        """Why the instance fails its health check now, or None if it passes."""
        ports = self.service.engine.ports
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT):
                stream = await ports.connect(sandbox_id, spec.port, passive=True)
                try:
                    if spec.health_path is None:
                        return None
                    request = f"GET {spec.health_path} HTTP/1.1\r\nHost: localhost\r\n"
                    await stream.send(f"{request}Connection: close\r\n\r\n".encode())
                    head = await stream.receive() or b""
                finally:
                    await stream.close()
        except TimeoutError:
            return f"no answer in {HEALTH_TIMEOUT:g} s"
        except CorralError as error:
            return error.message
        status = head.split(b"\r\n", 1)[0].split(b" ")
        if len(status) >= 2 and status[1][:1] in (b"2", b"3"):
            return None
        return f"GET {spec.health_path} answered {head[:60]!r}"

    def _copy_logs(self, instance: Instance) -> None:
        """Copy what the command writes to the host, from where the last copy stopped."""
        if instance.pid is None or (instance.copier is not None and not instance.copier.done()):
            return
        if instance.exited.is_set() or instance.copy_broken:
            return
        instance.copier = asyncio.create_task(self._copy(instance))

    async def _copy(self, instance: Instance) -> None:
        engine = self.service.engine
        sandbox_id = instance.sandbox_id
        try:
            for process in await engine.processes(sandbox_id):  # a copy cut off by a sleep
                if process.tag == COPY_TAG and process.running:
                    await engine.signal(sandbox_id, process.id, "SIGKILL")
            argv = ["tail", "-s", "0.2", "-c", f"+{instance.offset + 1}", "-F", LOG_FILE]
            argv += ["--pid", str(instance.pid)]
            copy = await engine.exec(sandbox_id, argv, tag=COPY_TAG)
            async for stream, data in copy.output():
                if stream == "stdout":
                    instance.offset += len(data)
                    instance.recent = (instance.recent + data)[-RECENT:]
                    await self.book.write(data, sandbox_id, instance.offset)
            if copy.lost:  # cut off by a sleep or a restart: copied again once it runs
                return
            result = await copy.wait()
        except InvalidRequest as error:  # no `tail` in the image: it will not appear
            self._no_logs(instance, error.message)
            return
        except CorralError:  # cut off by a sleep or a restart: copied again once it runs
            return
        if result.exit_code == 0:  # tail --pid ends once the command has
            if instance.waiter is not None:  # which knows how, if its stream is still there
                await asyncio.wait([instance.waiter], timeout=2)
            instance.exit_detail = instance.exit_detail or "ended"
            instance.exited.set()
        else:
            self._no_logs(instance, result.stderr.decode(errors="replace")[-300:])

    def _no_logs(self, instance: Instance, why: str) -> None:
        instance.copy_broken = True
        self.book.event("logs_unavailable", f"the output cannot be copied out ({why.strip()})")

    async def _extend(self, sandbox_id: str, expires_at: float | None) -> None:
        """Keep the instance's lifetime from running out while the deployment lives."""
        if expires_at is not None and expires_at - time.time() < EXTEND_BELOW:
            with contextlib.suppress(CorralError):
                await self.service.engine.set_timeout(sandbox_id, MAX_TIMEOUT)

    def _on_idle(self, spec: DeploymentSpec) -> str:
        """Hibernate when idle where the runtime can keep memory on disk, else pause."""
        engine = self.service.engine
        runtime = engine.runtimes.get(spec.runtime or engine.runtimes.default)
        can = runtime.checkpoints and runtime.checkpoint_refusal(spec.network) is None
        return "hibernate" if can else "pause"


def _ended(code: int | None, oom: bool) -> str:
    if oom:
        return "ran out of memory"
    return f"exited with code {code}" if code is not None else "was killed"


def new_deployment_id() -> str:
    return new_id("dp")
