"""A running command in a sandbox, as the host sees it: streamed output, stdin, signals, exit."""

from __future__ import annotations

import signal as signals
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from corral.agent import protocol as P
from corral.core.errors import AgentUnavailable, CorralError, InvalidRequest, SandboxFailed
from corral.core.models import ExecResult
from corral.engine.agentlink import AgentLink, Channel, unwrap

STREAM_NAMES = {P.STDOUT: "stdout", P.STDERR: "stderr"}


class Watcher(Protocol):
    """Something that follows a process's output and end (`Process.observe`)."""

    def output(self, stream: str, data: bytes) -> None: ...

    def input(self, size: int) -> None: ...

    def ended(self, result: ExecResult | None, error: BaseException | None = None) -> None: ...


class Process:
    """A process started with `Engine.exec`.

    Read its output with `output()` while it runs (or not at all), then `wait()` for the result;
    output not read through `output()` is returned in the result.

    Example:
        >>> proc = await engine.exec(sandbox_id, ["python3", "-c", "print(input())"], stdin=True)
        >>> await proc.write_stdin(b"hello\\n")
        >>> await proc.close_stdin()
        >>> (await proc.wait()).stdout
        b'hello\\n'
    """

    def __init__(
        self,
        link: AgentLink,
        channel: Channel,
        started: dict[str, Any],
        oom_check: Callable[[], bool],
        explain_loss: Callable[[AgentUnavailable], Awaitable[CorralError]],
    ) -> None:
        self._link = link
        self._channel = channel
        self.id: int = started["id"]
        self.pid: int = started["pid"]
        self._oom_check = oom_check
        self._explain_loss = explain_loss
        self._reply: dict[str, Any] | None = None
        self._result: ExecResult | None = None
        self._watchers: list[Watcher] = []

    def await_end(self) -> None:
        """Say that its caller waits for its end: a checkpoint of the sandbox (snapshot,
        fork, hibernation) lets it end first, for up to a few seconds, rather than cutting its
        output off (see `AgentLink.quiesce`)."""
        self._channel.awaited = True

    def observe(self, watcher: Watcher) -> None:
        """Show `watcher` each piece of output as it is read, how much input is written, and
        the end, once `wait()` returns or fails."""
        self._watchers.append(watcher)

    async def output(self) -> AsyncIterator[tuple[str, bytes]]:
        """Yield ("stdout" | "stderr", bytes) as the process writes, until it ends."""
        while self._reply is None:
            kind, payload = await self._channel.receive()
            if kind == P.REPLY:
                self._reply = payload
            elif kind in STREAM_NAMES:
                for watcher in self._watchers:
                    watcher.output(STREAM_NAMES[kind], payload)
                yield STREAM_NAMES[kind], payload

    @property
    def lost(self) -> bool:
        """Whether its output stopped because the agent's connection dropped (the sandbox
        slept, or the host restarted) rather than because the process ended: it may run on."""
        error = (self._reply or {}).get("error")
        return isinstance(error, dict) and error.get("code") == AgentUnavailable.default_code

    async def write_stdin(self, data: bytes | str) -> None:
        """Write to the process's stdin (or its terminal); needs `stdin=True` or a PTY."""
        if isinstance(data, str):
            data = data.encode()
        for watcher in self._watchers:
            watcher.input(len(data))
        await self._channel.send_data(P.STDIN, data)

    async def close_stdin(self) -> None:
        """Signal end of input (EOF on a pipe, ^D on a terminal)."""
        await self._channel.send_eof(P.STDIN)

    async def signal(self, sig: int | str = signals.SIGTERM) -> None:
        """Send a signal to the process's group (default SIGTERM); SIGKILL ends everything
        the process started, whatever its group or session."""
        name = sig.name if isinstance(sig, signals.Signals) else sig
        await self._link.call(P.PROC_SIGNAL, {"id": self.id, "signal": name})

    async def kill(self) -> None:
        await self.signal("SIGKILL")

    async def resize(self, rows: int, cols: int) -> None:
        """Resize the process's terminal (PTY processes only)."""
        if not (0 < rows < 10000 and 0 < cols < 10000):
            raise InvalidRequest("rows and cols must be between 1 and 9999")
        await self._link.call(P.PROC_RESIZE, {"id": self.id, "rows": rows, "cols": cols})

    async def wait(self) -> ExecResult:
        """Wait for the process to end; the result holds any output not read via `output()`."""
        if self._result is not None:
            return self._result
        try:
            result = await self._wait()
        except BaseException as exc:
            for watcher in self._watchers:
                watcher.ended(None, exc)
            raise
        for watcher in self._watchers:
            watcher.ended(result)
        return result

    async def _wait(self) -> ExecResult:
        out: list[bytes] = []
        err: list[bytes] = []
        async for name, data in self.output():
            (out if name == "stdout" else err).append(data)
        assert self._reply is not None
        try:
            result = unwrap(self._reply)
        except AgentUnavailable as exc:
            raise await self._explain_loss(exc) from exc
        if not isinstance(result, dict):
            raise SandboxFailed("the guest agent sent a malformed process result")
        killed = result.get("signal") == signals.SIGKILL and not result.get("timed_out")
        self._result = ExecResult(
            exit_code=result.get("exit_code"),
            stdout=b"".join(out),
            stderr=b"".join(err),
            signal=result.get("signal"),
            timed_out=bool(result.get("timed_out")),
            # The kernel's OOM killer, or the agent's (gVisor), which says so itself.
            oom_killed=bool(result.get("oom_killed")) or (killed and self._oom_check()),
            pid=self.pid,
            id=self.id,
        )
        return self._result
