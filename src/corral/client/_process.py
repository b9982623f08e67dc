"""A process running in a sandbox, driven over the exec WebSocket: `AsyncProcess` and its
synchronous twin `Process`."""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from corral.client._sync import Client, Twin, blocking
from corral.core.errors import ConnectionFailed, CorralError, from_response

if TYPE_CHECKING:
    from corral.client._transport import Socket

OutputCallback = Callable[[bytes], Awaitable[None] | None]
STDIN, STDOUT, STDERR = 0, 1, 2


@dataclass(frozen=True)
class ProcessExit:
    """How a streamed process ended."""

    exit_code: int | None
    signal: int | None = None
    timed_out: bool = False
    oom_killed: bool = False


class AsyncOutput:
    """One output stream of a process: iterate it for chunks of bytes as they arrive."""

    def __init__(self) -> None:
        import asyncio

        self._chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._ended = False

    def _put(self, data: bytes | None) -> None:
        self._chunks.put_nowait(data)

    def __aiter__(self) -> AsyncOutput:
        return self

    async def __anext__(self) -> bytes:
        if self._ended:
            raise StopAsyncIteration
        chunk = await self._chunks.get()
        if chunk is None:
            self._ended = True
            raise StopAsyncIteration
        return chunk

    async def read(self) -> bytes:
        """Everything (left) on the stream, once the process has ended."""
        return b"".join([chunk async for chunk in self])


class AsyncStdin:
    """The process's standard input (or its terminal's keyboard)."""

    def __init__(self, process: AsyncProcess) -> None:
        self._process = process

    async def write(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        await self._process._send(bytes((STDIN,)) + data)

    async def close(self) -> None:
        """End of input: EOF on a pipe, ^D on a terminal."""
        await self._process._control({"type": "stdin_close"})


class AsyncProcess:
    """A command started with `AsyncSandbox.exec`.

    Example:
        >>> proc = await sandbox.exec("python3", "-c", "print(input()[::-1])", stdin=True)
        >>> await proc.stdin.write("hello\\n")
        >>> await proc.stdin.close()
        >>> [chunk async for chunk in proc.stdout]
        [b'olleh\\n']
        >>> await proc.wait()
        0
    """

    def __init__(
        self,
        ws: Socket,
        started: dict[str, Any],
        on_stdout: OutputCallback | None,
        on_stderr: OutputCallback | None,
    ) -> None:
        import asyncio

        self._ws = ws
        self.id: int = started["id"]
        self.pid: int = started["pid"]
        self.stdout = AsyncOutput()
        self.stderr = AsyncOutput()
        self.stdin = AsyncStdin(self)
        self._callbacks = {STDOUT: on_stdout, STDERR: on_stderr}
        self._exit: ProcessExit | None = None
        self._error: CorralError | None = None
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def start(
        cls,
        ws: Socket,
        request: dict[str, Any],
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> AsyncProcess:
        await ws.send(json.dumps(request))
        first = json.loads(await ws.recv())
        if first.get("type") == "error":
            await ws.close()
            raise _stream_error(first)
        return cls(ws, first, on_stdout, on_stderr)

    async def _read(self) -> None:
        outputs = {STDOUT: self.stdout, STDERR: self.stderr}
        try:
            async for message in self._ws.messages():
                if isinstance(message, bytes):
                    channel, data = message[0], message[1:]
                    callback = self._callbacks.get(channel)
                    if callback is not None:
                        outcome = callback(data)
                        if inspect.isawaitable(outcome):
                            await outcome
                    elif channel in outputs:
                        outputs[channel]._put(data)
                    continue
                event = json.loads(message)
                if event.get("type") == "exit":
                    self._exit = ProcessExit(
                        event.get("exit_code"),
                        event.get("signal"),
                        bool(event.get("timed_out")),
                        bool(event.get("oom_killed")),
                    )
                elif event.get("type") == "error":
                    self._error = _stream_error(event)
        finally:
            if self._exit is None and self._error is None:
                self._error = ConnectionFailed("the exec stream closed before the process ended")
            self.stdout._put(None)
            self.stderr._put(None)

    async def _send(self, frame: bytes | str) -> None:
        try:
            await self._ws.send(frame)
        except ConnectionFailed as exc:
            raise self._error or exc from exc

    async def _control(self, message: dict[str, Any]) -> None:
        await self._send(json.dumps(message))

    async def wait(self) -> int:
        """Wait for the process to end; its exit code (128 + the signal if killed, as in sh)."""
        result = await self.result()
        if result.exit_code is not None:
            return result.exit_code
        return 128 + (result.signal or 0)

    async def result(self) -> ProcessExit:
        """Wait for the process to end; how it ended, in full."""
        import asyncio

        await asyncio.shield(self._reader)
        if self._exit is None:
            assert self._error is not None
            raise self._error
        return self._exit

    async def signal(self, sig: str | int = "SIGTERM") -> None:
        """Send a signal to the process and its process group."""
        await self._control({"type": "signal", "signal": sig})

    async def kill(self) -> None:
        """Kill the process and everything it started, whatever its group (SIGKILL)."""
        await self.signal("SIGKILL")

    async def resize(self, rows: int, cols: int) -> None:
        """Resize the terminal of a process started with `pty`. A shell that uses readline
        (bash) reads the size and writes it back as it prepares each prompt, so a resize that
        lands between the two is undone: resize again if the size must hold."""
        await self._control({"type": "resize", "rows": rows, "cols": cols})

    async def close(self) -> None:
        """Hang up: the server kills the process if it is still running."""
        import asyncio

        await self._ws.close()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


def _stream_error(event: dict[str, Any]) -> CorralError:
    error = event.get("error") or {}
    return from_response(
        int(event.get("status") or 500),
        str(error.get("code", "stream_error")),
        str(error.get("message", "the exec stream failed")),
    )


class Output(Twin[AsyncOutput]):
    """One output stream of a process: iterate it for chunks of bytes as they arrive."""

    def __iter__(self) -> Iterator[bytes]:
        while True:
            try:
                yield self._run(_next_chunk(self._async))
            except StopAsyncIteration:
                return

    read = blocking(AsyncOutput.read)


async def _next_chunk(output: AsyncOutput) -> bytes:
    return await anext(output)


class Stdin(Twin[AsyncStdin]):
    """The process's standard input (or its terminal's keyboard)."""

    write = blocking(AsyncStdin.write)
    close = blocking(AsyncStdin.close)


class Process(Twin[AsyncProcess]):
    """A process started with `Sandbox.exec` (see `AsyncProcess`)."""

    def __init__(self, client: Client, process: AsyncProcess) -> None:
        super().__init__(client, process)
        self.id = process.id
        self.pid = process.pid
        self.stdout = Output(client, process.stdout)
        self.stderr = Output(client, process.stderr)
        self.stdin = Stdin(client, process.stdin)

    wait = blocking(AsyncProcess.wait)
    result = blocking(AsyncProcess.result)
    signal = blocking(AsyncProcess.signal)
    kill = blocking(AsyncProcess.kill)
    resize = blocking(AsyncProcess.resize)
    close = blocking(AsyncProcess.close)
