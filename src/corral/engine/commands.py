"""Commands in sandboxes: checked here, started by the guest agent, streamed as `Process`es."""

from __future__ import annotations

import asyncio
import contextlib
import signal as signals
import time
from collections.abc import Mapping, Sequence
from typing import Any

from corral.agent import protocol as P
from corral.core.errors import (
    AgentUnavailable,
    CorralError,
    InvalidRequest,
    SandboxEnded,
    SandboxFailed,
)
from corral.core.models import ExecResult, ProcessInfo
from corral.core.spec import MAX_TIMEOUT, check_env, check_sandbox_path
from corral.engine.access import Access
from corral.engine.agentlink import unwrap
from corral.engine.process import Process
from corral.engine.record import SandboxRecord
from corral.engine.runtime_set import RuntimeSet


def command_params(
    record: SandboxRecord,
    argv: Sequence[str] | None,
    *,
    cmd: str | None,
    env: Mapping[str, str] | None,
    cwd: str | None,
    user: str | int | None,
    stdin: bool,
    pty: tuple[int, int] | None,
    timeout: float | None,
    tag: str | None,
) -> dict[str, Any]:
    """The agent's `PROC_START` parameters for a command, or `InvalidRequest` saying what is
    wrong with it. The sandbox's own env and workdir come from its spec on every command (not
    only from the agent's start), so a sandbox claimed from a warm pool gets the request's."""
    params: dict[str, Any] = {"stdin": bool(stdin)}
    if (argv is None) == (cmd is None):
        raise InvalidRequest("give either argv (a list of strings) or cmd (a shell string)")
    if argv is not None:
        if isinstance(argv, str | bytes) or not argv or not all(isinstance(a, str) for a in argv):
            raise InvalidRequest("argv must be a non-empty list of strings")
        if any("\0" in a for a in argv):
            raise InvalidRequest("argv must not contain NUL bytes")
        params["argv"] = list(argv)
    elif not isinstance(cmd, str) or not cmd.strip() or "\0" in cmd:
        raise InvalidRequest("cmd must be a non-empty shell command without NUL bytes")
    else:
        params["cmd"] = cmd
    if env is not None:
        check_env(env)
    merged = {**record.plan.env, **record.spec.env, **(env or {})}
    if merged:
        params["env"] = check_env(merged)
    params["cwd"] = (
        check_sandbox_path(cwd, "cwd")
        if cwd is not None
        else record.spec.workdir or record.plan.workdir
    )
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
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise InvalidRequest(f"timeout must be a number of seconds, got {timeout!r}")
        if not 0 < timeout <= MAX_TIMEOUT:
            raise InvalidRequest(f"timeout must be 0 to {MAX_TIMEOUT:g} seconds, got {timeout!r}")
        params["timeout"] = float(timeout)
    if tag is not None:
        params["tag"] = str(tag)[:256]
    return params


class Commands:
    """Starts processes in sandboxes and talks to them through their agents."""

    def __init__(self, access: Access, runtimes: RuntimeSet) -> None:
        self._access = access
        self._runtimes = runtimes

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
        """Start a process (see `Engine.exec`); returns once it has started."""
        record = await self._access.use(sandbox_id, "run a command in")
        params = command_params(
            record,
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
        runtime = self._runtimes.get(record.runtime)
        ooms_before = runtime.oom_kills(record.plan)  # one small cgroup file read
        try:
            channel = await record.link.open(P.PROC_START, params)
            kind, payload = await channel.receive()
            if kind == P.REPLY:
                unwrap(payload)
                raise SandboxFailed("the guest agent ended the process before starting it")
        except AgentUnavailable as exc:
            if record.ending or not record.alive:  # ended under us: say so, with the reason
                raise await explain_loss(record, exc) from exc
            raise
        if kind != P.EVENT or payload.get("type") != "started":
            raise SandboxFailed(f"unexpected first frame from the guest agent: {kind}")

        def oom_check() -> bool:
            return runtime.oom_kills(record.plan) > ooms_before

        async def lost(error: AgentUnavailable) -> CorralError:
            return await explain_loss(record, error)

        return Process(record.link, channel, payload, oom_check, lost)

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
        """Run a command to completion (see `Engine.run`)."""
        shell = isinstance(cmd, str)
        process = await self.exec(
            sandbox_id,
            None if shell else list(cmd),
            cmd=cmd if isinstance(cmd, str) else None,
            env=env,
            cwd=cwd,
            user=user,
            timeout=timeout,
            stdin=stdin is not None,
        )
        process.await_end()
        if stdin is not None:
            await process.write_stdin(stdin)
            await process.close_stdin()
        return await process.wait()

    async def processes(self, sandbox_id: str) -> list[ProcessInfo]:
        record = await self._access.use(sandbox_id, "list the processes of")
        return [ProcessInfo.from_guest(p) for p in await agent_call(record, P.PROC_LIST, {})]

    async def signal(self, sandbox_id: str, process_id: int, sig: int | str) -> None:
        record = await self._access.use(sandbox_id, "signal a process in")
        name = sig.name if isinstance(sig, signals.Signals) else sig
        await agent_call(record, P.PROC_SIGNAL, {"id": process_id, "signal": name})

    async def kill_all(self, sandbox_id: str) -> int:
        record = await self._access.use(sandbox_id, "kill the processes of")
        result = await agent_call(record, P.PROC_KILL_ALL, {})
        return int(result["killed"])

    async def ping(self, sandbox_id: str) -> float:
        record = await self._access.use(sandbox_id, "ping")
        start = time.perf_counter()
        await agent_call(record, P.PING, {})
        return time.perf_counter() - start


async def agent_call(record: SandboxRecord, method: str, params: dict[str, Any]) -> Any:
    """One CALL to the sandbox's agent; a connection lost because the sandbox ended meanwhile
    (terminated, out of memory) is `SandboxEnded`, saying why."""
    try:
        return await record.link.call(method, params)
    except AgentUnavailable as exc:
        raise await explain_loss(record, exc) from exc


async def explain_loss(record: SandboxRecord, error: AgentUnavailable) -> CorralError:
    """When the agent's connection drops because the sandbox ended, say so and why."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(record.exited.wait(), 5)
    for _ in range(100):  # the watcher records the end right after the exit
        if not record.alive:
            reason = record.end_reason.value if record.end_reason else "unknown"
            return SandboxEnded(f"sandbox {record.id} ended ({reason}) during the command")
        await asyncio.sleep(0.05)
    return error
