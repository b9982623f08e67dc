"""One execution in a code context, as the guest agent passes it on: the kernel's JSON lines
read without blocking, and forwarded to the host within bounds. Each of stdout and stderr keeps
OUTPUT_LIMIT bytes and the results RESULTS_LIMIT together (a result over RESULT_LIMIT is
dropped with a note), so no code can flood the host.

Standard library only, for any Python >= 3.8, like the rest of the agent.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # `typing` is for annotations only: 2 ms of every agent's start (aio)
if TYPE_CHECKING:
    from typing import Any, Awaitable, Callable, Dict, List, Optional

    Send = Callable[[Dict[str, Any]], Awaitable[None]]

try:
    from corral.agent import aio, aiosync, lean
except ImportError:  # inside the sandbox the agent directory itself is on sys.path
    import aio  # type: ignore[import-not-found,no-redef]
    import aiosync  # type: ignore[import-not-found,no-redef]
    import lean  # type: ignore[import-not-found,no-redef]

OUTPUT_LIMIT = 4 * 1024 * 1024  # per stream, per execution
RESULT_LIMIT = 8 * 1024 * 1024  # one result's JSON
RESULTS_LIMIT = 32 * 1024 * 1024  # all of an execution's results
READ_CHUNK = 65536
# Messages read from a kernel and not yet taken: past this the agent stops reading its pipe
# (the kernel then waits to write) until half have been taken. Between executions nothing takes
# them, and code that prints from a thread of its own would otherwise fill the agent's memory.
MAX_QUEUED = 1000


class TooBig:
    """A line the kernel sent that was over the limit, dropped: only its size is kept."""

    def __init__(self, size: int) -> None:
        self.size = size


class Lines:
    """JSON lines from a kernel's descriptor; a line over `limit` becomes a `too_big` note.
    Read as they come (`watch`), at most MAX_QUEUED (and one read's) waiting at a time."""

    def __init__(self, fd: int, limit: int) -> None:
        self.fd = fd
        self.limit = limit
        self.pending = b""
        self.skipping = 0  # bytes of an oversized line dropped so far
        self.ready: "aiosync.Queue[Any]" = aiosync.Queue()  # dicts, TooBig, None at the end
        self.paused = False
        self.ended = False  # None queued

    def watch(self) -> None:
        """Read the descriptor whenever the kernel has written; close it at its end."""
        aio.get_event_loop().add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        if not self.feed():
            self.close()
        elif self.ready.qsize() >= MAX_QUEUED:
            aio.get_event_loop().remove_reader(self.fd)
            self.paused = True

    def close(self) -> None:
        """Stop reading (what the kernel wrote and was not read is dropped); its end is queued
        all the same, for whoever follows it."""
        if self.fd >= 0:
            aio.get_event_loop().remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1
        if not self.ended:
            self.ended = True
            self.ready.put_nowait(None)

    async def next(self) -> Any:
        """The next message (None: the kernel's end); reading goes on once half are taken."""
        message = await self.ready.get()
        if self.paused and self.ready.qsize() <= MAX_QUEUED // 2:
            self.paused = False
            if self.fd >= 0:
                self.watch()
        return message

    def feed(self) -> bool:
        """Read what is there; False at end of file."""
        try:
            chunk = os.read(self.fd, READ_CHUNK)
        except BlockingIOError:
            return True
        except OSError:
            chunk = b""
        if not chunk:
            self.ended = True
            self.ready.put_nowait(None)
            return False
        self.pending += chunk
        while True:
            end = self.pending.find(b"\n")
            if end < 0:
                if self.skipping or len(self.pending) > self.limit:
                    self.skipping += len(self.pending)
                    self.pending = b""
                return True
            line, self.pending = self.pending[:end], self.pending[end + 1 :]
            if self.skipping:
                self.ready.put_nowait(TooBig(self.skipping + len(line)))
                self.skipping = 0
                continue
            try:
                message = lean.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict):
                self.ready.put_nowait(message)


class Execution:
    """One run of code in a context: what it sent, within its bounds."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.sent = {"stdout": 0, "stderr": 0, "results": 0}
        self.cut = {"stdout": False, "stderr": False, "results": False}
        self.errors = 0
        self.count: Optional[int] = None
        self.timed_out = False
        self.stuck = False
        self.lost = False
        self.over = False
        self.pending: List[Dict[str, Any]] = []
        self.held = {"stdout": 0, "stderr": 0}  # bytes in `pending`

    def raw(self, name: str, data: bytes) -> None:
        """Output a process the code started wrote straight to the kernel's fd 1 or 2, held
        for the next message: no more than its stream may still send, and a byte over to have
        it cut with its note (a flood must not fill the agent's memory meanwhile)."""
        room = OUTPUT_LIMIT - self.sent[name] - self.held[name]
        if room < 0 or self.cut[name]:
            return
        data = data[: room + 1]
        self.held[name] += len(data)
        self.pending.append({"type": name, "text": data.decode("utf-8", "replace")})

    async def follow(self, lines: Lines, proc: Any) -> None:
        """Pass the kernel's messages on until its execution's `done` or the kernel's end."""
        while True:
            message = await lines.next()
            for early in self.pending:
                await self.forward(early)
            self.pending = []
            self.held = {"stdout": 0, "stderr": 0}
            if message is None:
                self.lost = True
                await proc.exited.wait()
                break
            if isinstance(message, dict) and message.get("type") == "done":
                count = message.get("execution_count")
                self.count = count if isinstance(count, int) else 0
                break
            await self.forward(message)
        self.over = True

    async def forward(self, message: Any) -> None:
        """Pass one kernel message on, in the shape the host expects. The kernel's channel is
        writable by the code it runs, so anything else (a forged note, a result without data)
        is dropped here rather than trusted."""
        if isinstance(message, TooBig):
            limit = RESULT_LIMIT >> 20
            await self._drop("a result of %d bytes is over %d MiB" % (message.size, limit))
            return
        kind = message.get("type")
        if kind in ("stdout", "stderr"):
            await self._output(kind, str(message.get("text", "")))
        elif kind == "result" and isinstance(message.get("data"), dict):
            result = {"type": kind, "data": message["data"]}
            result["is_main_result"] = bool(message.get("is_main_result"))
            size = len(lean.dumps(result))
            if self.sent["results"] + size > RESULTS_LIMIT:
                await self._drop("the execution's results are over %d MiB" % (RESULTS_LIMIT >> 20))
                return
            self.sent["results"] += size
            await self.send(result)
        elif kind == "error":
            self.errors += 1
            error = {name: str(message.get(name, "")) for name in ("name", "value", "traceback")}
            if self.timed_out and error["name"] == "KeyboardInterrupt":
                error["name"] = "TimeoutError"
                error["value"] = "the execution timed out; the context and its variables are kept"
            await self.send({"type": "error", **error})

    async def _output(self, kind: str, text: str) -> None:
        """Pass output on up to OUTPUT_LIMIT bytes of its stream; then one note, and no more."""
        if self.cut[kind]:
            return
        data = text.encode()
        room = OUTPUT_LIMIT - self.sent[kind]
        if len(data) <= room:
            self.sent[kind] += len(data)
            await self.send({"type": kind, "text": text})
            return
        self.cut[kind] = True
        note = "\n[output cut: over %d MiB of %s in this execution]\n" % (OUTPUT_LIMIT >> 20, kind)
        await self.send({"type": kind, "text": data[:room].decode("utf-8", "ignore") + note})

    async def _drop(self, why: str) -> None:
        self.cut["results"] = True
        await self.send({"type": "stderr", "text": "[result dropped: %s]\n" % why})

    async def lose(self, context: Any) -> None:
        proc = context.proc
        oom = proc is not None and proc.oom_killed
        if self.stuck:
            why = "did not stop after its timeout and was killed"
        elif oom:
            why = "ran out of memory"
        else:
            status = proc.result() if proc is not None else {}
            why = "exited (exit code %s, signal %s)" % (
                status.get("exit_code"),
                status.get("signal"),
            )
        await self.send(
            {
                "type": "error",
                "name": "ContextLost",
                "value": "the context's interpreter %s; it was restarted and its variables are lost"
                % why,
                "traceback": "",
            }
        )

    def summary(self, context: Any) -> Dict[str, Any]:
        return {
            "context": context.id,
            "execution_count": self.count if self.count is not None else 0,
            "timed_out": self.timed_out,
            "context_lost": self.lost,
            "truncated": any(self.cut.values()),
        }
