"""Sandboxes for one tenant: create and fork, look, change, end; commands, files and events."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from typing import Any

from corral.core.egress import EgressPolicy
from corral.core.errors import CorralError, SandboxNotFound
from corral.core.models import ExecResult, ProcessInfo, SandboxInfo, UsageSample
from corral.core.spec import SandboxSpec
from corral.core.state import parse_state
from corral.engine.files import SandboxFiles
from corral.engine.interpreter import Interpreter
from corral.engine.ports import PortStream
from corral.engine.process import Process
from corral.engine.usage import SAMPLE_EVERY
from corral.server import tracing
from corral.server.audit.trail import (
    Action,
    CodeWatch,
    ExecWatch,
    bounded,
    command_detail,
    concerns,
)
from corral.server.metrics import CREATE_SECONDS, EXEC_SECONDS, timed
from corral.server.tenancy import Tenant
from corral.server.tracing import span

__all__ = [
    "SAMPLE_EVERY",
    "Command",
    "Interpreter",
    "PortStream",
    "Process",
    "SandboxFiles",
    "Sandboxes",
]  # the routes use these types


@dataclasses.dataclass(frozen=True)
class Command:
    """A command as a request describes it: `cmd` through the shell, or an `argv`."""

    cmd: str | None = None
    argv: Sequence[str] | None = None
    env: Mapping[str, str] | None = None
    cwd: str | None = None
    user: str | int | None = None
    timeout: float | None = None
    tag: str | None = None


class Sandboxes:
    """The sandboxes of one tenant."""

    def __init__(self, tenant: Tenant) -> None:
        self._tenant = tenant
        self._service = tenant.service
        self._engine = tenant.service.engine

    async def create(
        self, spec: SandboxSpec, *, pool: bool = True, snapshot: str | None = None
    ) -> SandboxInfo:
        """A sandbox: from `spec`, or from one of the tenant's snapshots (by id or name)."""
        tenant = self._tenant
        snapshot_id = tenant.snapshot(snapshot).id if snapshot is not None else None
        spec = await tenant.spec(spec, image=snapshot_id is None)
        spec = self._service.with_key_network(tenant.id, spec)
        async with self._service.admitting(tenant.id, 1, spec):
            start = time.perf_counter()
            info = await self._engine.create(spec, pool=pool, snapshot=snapshot_id)
            CREATE_SECONDS.labels(info.runtime).observe(time.perf_counter() - start)
            laps = self._engine.registry.get(info.id).timings
            tracing.stages("engine.create", laps, sandbox_id=info.id, runtime=info.runtime)
            self._service.own(tenant.id, info)
        concerns(info.id)
        # With a store of its own, answered before the store has it: the owner is journalled
        # (`Service.own`), so an answered create survives a crash of the server. A shared
        # store is how other servers (a cluster's fronts) find the sandbox: there, it first is.
        if not self._service.own_store:
            await self._service.recorded()
        return self._engine.get(info.id)

    async def fork(self, sandbox_id: str, count: int) -> builtins.list[SandboxInfo]:
        """`count` copies of one of the tenant's sandboxes, memory and files."""
        sandbox_id = await self._tenant.sandbox(sandbox_id)
        source = self._engine.get(sandbox_id).spec
        copies = count if isinstance(count, int) else 1
        async with self._service.admitting(self._tenant.id, copies, source):
            made = await self._engine.fork(sandbox_id, count)
            for info in made:
                self._service.own(self._tenant.id, info)
        if not self._service.own_store:  # as for `create`
            await self._service.recorded()
        return [self._engine.get(info.id) for info in made]

    async def info(self, sandbox_id: str) -> SandboxInfo:
        """The sandbox as it is now, or as it ended (for 7 days)."""
        sandbox_id = await self._tenant.sandbox(sandbox_id)
        with contextlib.suppress(SandboxNotFound):
            return self._engine.get(sandbox_id)
        await self._service.recorded()  # it may have ended a moment ago
        found = await self._service.store.get_sandbox(sandbox_id)
        if found is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id}")
        return found[1]

    async def list(self, state: str | None, metadata: Mapping[str, str]) -> list[SandboxInfo]:
        """The tenant's sandboxes, oldest first, optionally filtered."""
        wanted = parse_state(state) if state is not None else None
        await self._service.recorded()  # a sandbox just created is listed
        found = []
        for stored in await self._service.store.list_sandboxes(owner=self._tenant.id):
            try:
                info = self._engine.get(stored.id)
            except SandboxNotFound:
                info = stored
            if wanted is not None and info.state is not wanted:
                continue
            if any(info.spec.metadata.get(k) != v for k, v in metadata.items()):
                continue
            found.append(info)
        return found

    async def terminate(self, sandbox_id: str) -> SandboxInfo:
        sandbox_id = await self._tenant.sandbox(sandbox_id)
        with contextlib.suppress(SandboxNotFound):  # ended long ago: only the store knows it
            await self._engine.terminate(sandbox_id)
        return await self.info(sandbox_id)

    async def set_timeout(self, sandbox_id: str, seconds: float) -> SandboxInfo:
        return await self._engine.set_timeout(await self._tenant.sandbox(sandbox_id), seconds)

    async def set_egress(self, sandbox_id: str, egress: EgressPolicy) -> SandboxInfo:
        return await self._engine.set_egress(await self._tenant.sandbox(sandbox_id), egress)

    async def pause(self, sandbox_id: str) -> SandboxInfo:
        return await self._engine.pause(await self._tenant.sandbox(sandbox_id))

    async def resume(self, sandbox_id: str) -> SandboxInfo:
        return await self._engine.resume(await self._tenant.sandbox(sandbox_id))

    async def hibernate(self, sandbox_id: str) -> SandboxInfo:
        return await self._engine.hibernate(await self._tenant.sandbox(sandbox_id))

    async def wake(self, sandbox_id: str) -> SandboxInfo:
        return await self._engine.wake(await self._tenant.sandbox(sandbox_id))

    # -- commands ---------------------------------------------------------------------------

    async def start(
        self,
        sandbox_id: str,
        command: Command,
        *,
        stdin: bool = False,
        pty: tuple[int, int] | None = None,
    ) -> Process:
        """Start `command` in the sandbox; returns once it runs. It is recorded in the audit
        log when it ends (or when its request does, if that comes first)."""
        sandbox_id = await self._tenant.sandbox(sandbox_id)
        detail = command_detail(
            command.cmd, command.argv, command.env, cwd=command.cwd, user=command.user,
            timeout=command.timeout, tag=command.tag, stdin=stdin, pty=pty is not None,
        )  # fmt: skip
        action = Action(self._service.audit, self._tenant.id, "exec", sandbox_id, detail)
        try:
            process = await self._engine.exec(
                sandbox_id,
                command.argv,
                cmd=command.cmd,
                env=command.env,
                cwd=command.cwd,
                user=command.user,
                stdin=stdin,
                pty=pty,
                timeout=command.timeout,
                tag=command.tag,
            )
        except BaseException as exc:
            action.failed(exc)
            raise
        if self._service.audit.enabled:
            process.observe(ExecWatch(action))
        return process

    async def run(
        self, sandbox_id: str, command: Command, stdin: str | None = None
    ) -> tuple[ExecResult, bool]:
        """Run `command` to completion; its result, each stream cut at the server's limit, and
        whether anything was cut."""
        with self._tenant.hold("exec"):
            sandbox_id = await self._tenant.sandbox(sandbox_id)
            runtime = self._engine.get(sandbox_id).runtime
            with timed(EXEC_SECONDS, runtime), span("engine.exec", sandbox_id=sandbox_id):
                return await self._run(sandbox_id, command, stdin)

    async def _run(
        self, sandbox_id: str, command: Command, stdin: str | None
    ) -> tuple[ExecResult, bool]:
        process = await self.start(sandbox_id, command, stdin=stdin is not None)
        process.await_end()
        if stdin is not None:
            await process.write_stdin(stdin)
            await process.close_stdin()
        limit = self._service.config.max_output_bytes
        kept = {"stdout": bytearray(), "stderr": bytearray()}
        truncated = False
        budget, key_id, held = self._service.in_flight, self._tenant.id, 0
        try:
            async with self.active(sandbox_id):  # its client waits: the sandbox is in use
                async for name, data in process.output():
                    buffer = kept[name]
                    # Each stream keeps its first `limit` bytes, and all the key's commands
                    # together hold at most BUFFERED_BYTES; the rest is drained and dropped,
                    # so the process is never blocked on its output.
                    granted = budget.buffer(key_id, min(len(data), max(limit - len(buffer), 0)))
                    held += granted
                    truncated = truncated or granted < len(data)
                    buffer += data[:granted]
                result = await process.wait()
        finally:
            budget.release(key_id, held)
        stdout, stderr = bytes(kept["stdout"]), bytes(kept["stderr"])
        return dataclasses.replace(result, stdout=stdout, stderr=stderr), truncated

    async def metrics(self, sandbox_id: str) -> builtins.list[UsageSample]:
        """The sandbox's recent use, oldest first (empty while hibernated or ended)."""
        sandbox_id = await self._tenant.sandbox(sandbox_id)
        with contextlib.suppress(SandboxNotFound):
            return self._engine.usage.history(sandbox_id)
        return []

    def latest_metrics(self) -> builtins.list[tuple[SandboxInfo, UsageSample | None]]:
        """Each of the tenant's live sandboxes with its newest sample."""
        latest = self._engine.usage.latest()
        mine = [sid for sid, owner in self._service.owners().items() if owner == self._tenant.id]
        return [(self._engine.get(sid), latest.get(sid)) for sid in mine]

    async def processes(self, sandbox_id: str) -> builtins.list[ProcessInfo]:
        return await self._engine.processes(await self._tenant.sandbox(sandbox_id))

    async def signal(self, sandbox_id: str, process_id: int, sig: str | int) -> None:
        await self._engine.signal(await self._tenant.sandbox(sandbox_id), process_id, sig)

    async def kill_all(self, sandbox_id: str) -> int:
        return await self._engine.kill_all(await self._tenant.sandbox(sandbox_id))

    # -- files, attached streams, events ----------------------------------------------------------

    async def files(self, sandbox_id: str) -> SandboxFiles:
        return self._engine.files(await self._tenant.sandbox(sandbox_id))

    async def connect_port(self, sandbox_id: str, port: int) -> PortStream:
        """A TCP connection to `port` inside the sandbox (half-closed when the client is done
        sending), through its agent."""
        sandbox_id = await self._tenant.sandbox(sandbox_id)
        return await self._engine.ports.connect(sandbox_id, port, half_close=True)

    async def run_code(
        self,
        sandbox_id: str,
        code: str,
        *,
        language: str,
        context: str | None,
        env: Mapping[str, str] | None,
        timeout: float | None,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Run code in one of the sandbox's code contexts: its events (see `corral.core.code`),
        recorded in the audit log when they end or are no longer read."""
        sandbox_id, interpreter = await self.interpreter(sandbox_id)
        kept, cut = bounded(code)
        detail = {"code": kept, "cut": cut, "language": language, "context": context,
                  "env": sorted(env or {}), "timeout": timeout}  # fmt: skip
        detail = {k: v for k, v in detail.items() if v}
        action = Action(self._service.audit, self._tenant.id, "code", sandbox_id, detail)
        try:
            events = await interpreter.run(
                sandbox_id, code, language=language, context=context, env=env, timeout=timeout
            )
        except BaseException as exc:
            action.failed(exc)
            raise
        return _watched(events, action) if self._service.audit.enabled else events

    async def interpreter(self, sandbox_id: str) -> tuple[str, Interpreter]:
        """The code interpreter, and the sandbox's id once this key is known to own it."""
        return await self._tenant.sandbox(sandbox_id), self._engine.interpreter

    def hold(self, kind: str) -> contextlib.AbstractContextManager[None]:
        """One of the key's expensive calls of `kind` in flight: 429 past its limit."""
        return self._tenant.hold(kind)

    @contextlib.asynccontextmanager
    async def active(self, sandbox_id: str) -> AsyncIterator[None]:
        """Count the sandbox as in use while the block runs (a transfer, an attached client)."""
        with self._engine.active(await self._tenant.sandbox(sandbox_id)):
            yield

    async def events(
        self, sandbox_id: str | None
    ) -> contextlib.AbstractContextManager[asyncio.Queue[dict[str, Any]]]:
        """A subscription to the state changes of the tenant's sandboxes (or of one)."""
        if sandbox_id is not None:
            await self._tenant.sandbox(sandbox_id)
        return self._service.events.subscribe(self._tenant.id)


async def _watched(
    events: AsyncGenerator[dict[str, Any], None], action: Action
) -> AsyncGenerator[dict[str, Any], None]:
    watch = CodeWatch()
    try:
        async for event in events:
            watch.event(event)
            yield event
    except CorralError as exc:
        action.failed(exc)
        raise
    finally:  # ended, or no longer read (its client went away): recorded before any await
        action.finish(error=None if watch.ended else "cancelled", outcome=watch.outcome())
        await events.aclose()
