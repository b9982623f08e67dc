"""Code contexts in the guest agent: one kernel process each (see `kernel`), kept across calls.

A context runs one execution at a time (others wait their turn); several contexts run in
parallel. An execution streams the kernel's messages to the host within bounds (see
`execution`). A timeout or the host's CANCEL interrupts the code (SIGINT) and keeps the
context; a kernel that dies (its code called `os._exit`, crashed it, ran it out of memory) is
reported as lost and restarted. Python runs in every image (the agent's own); javascript and
bash where the image has `node` and `bash`.

Standard library only, for any Python >= 3.8, like the rest of the agent.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # `typing` is for annotations only: 2 ms of every agent's start (aio)
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, List, Optional

    from corral.agent.execution import Send

try:
    from corral.agent import aio, aiosync, procs, tree
    from corral.agent import protocol as P
    from corral.agent.execution import RESULT_LIMIT, Execution, Lines
    from corral.agent.fileops import GuestError
    from corral.agent.lean import dumps, signal
    from corral.agent.procs import Proc
except ImportError:  # inside the sandbox the agent directory itself is on sys.path
    import aio  # type: ignore[import-not-found,no-redef]
    import aiosync  # type: ignore[import-not-found,no-redef]
    import procs  # type: ignore[import-not-found,no-redef]
    import protocol as P  # type: ignore[import-not-found,no-redef]
    import tree  # type: ignore[import-not-found,no-redef]
    from execution import RESULT_LIMIT, Execution, Lines  # type: ignore[import-not-found,no-redef]
    from fileops import GuestError  # type: ignore[import-not-found,no-redef]
    from lean import dumps, signal  # type: ignore[import-not-found,no-redef]
    from procs import Proc  # type: ignore[no-redef]

HERE = os.path.dirname(os.path.abspath(__file__))
# Each language's kernel: the program that runs it (found on the context's PATH) and its script.
KERNELS = {
    "python": (None, "kernel.py"),  # the agent's own Python
    "javascript": ("node", "kernel.js"),
    "bash": ("bash", "kernel_bash.py"),  # driven from Python
}
MAX_CONTEXTS = 32
READ_CHUNK = 65536
INTERRUPT_GRACE = 2.0  # after SIGINT, before a context that does not stop is killed
READY_TIMEOUT = 120.0  # for a kernel to load (IPython under gVisor on a busy machine)


def which(program: str, path: Optional[str]) -> Optional[str]:
    import shutil  # noqa: PLC0415 - not at the agent's start (see `fileops.fs_remove`)

    return shutil.which(program, path=path)


def available(path: Optional[str]) -> List[str]:
    """The languages whose programs this sandbox has (on `path`)."""
    return [
        name for name, (program, _) in KERNELS.items() if program is None or which(program, path)
    ]


def check_language(language: Any, path: Optional[str]) -> str:
    if language not in KERNELS or language not in available(path):
        raise GuestError(
            "unsupported_language",
            "language %r is not available in this sandbox; available: %s (an image with Node.js "
            "adds javascript: the code-interpreter image has it)"
            % (language, ", ".join(available(path))),
        )
    return str(language)


def kernel_argv(language: str, path: Optional[str]) -> List[str]:
    """How a context of `language` starts; its two descriptors are appended at its start."""
    program, script = KERNELS[language]
    if program == "node":
        return [which(program, path) or program, os.path.join(HERE, script)]
    return [sys.executable, os.path.join(HERE, script)]


class Context:
    """One code context: its kernel process and what streams to the running execution."""

    def __init__(self, context_id: str, params: Dict[str, Any], base_env: Dict[str, str]) -> None:
        self.id = context_id
        wanted = {key: params.get(key) for key in ("cwd", "env", "user")}
        self.command = procs.Command(dict(wanted, argv=["-"]), base_env)
        path = self.command.env.get("PATH")
        self.language = check_language(params.get("language") or "python", path)
        self.command.argv = [*kernel_argv(self.language, path), "3", "4"]  # the fds, at start
        self.lock = aiosync.Lock()
        self.proc: Optional[Proc] = None
        self.lines: Optional[Lines] = None
        self.requests = -1
        self.sink: Optional[Callable[[str, bytes], None]] = None  # the kernel's raw fd 1 and 2
        self.restarts = 0
        self.executions = 0
        self.pooled = bool(params.get("pooled"))
        self.running: Optional["Execution"] = None  # the execution under way, if any

    def describe(self) -> Dict[str, Any]:
        running = self.proc is not None and not self.proc.exited.is_set()
        return {
            "id": self.id,
            "language": self.language,
            "cwd": self.command.cwd,
            "running": running,
            "pid": self.proc.pid if running and self.proc else None,
            "execution_count": self.executions,
            "restarts": self.restarts,
        }

    def start(self, agent: Any) -> None:
        """Start the kernel; the agent registers it like any process (so it is reaped)."""
        loop = aio.get_event_loop()
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        self.command.argv[-2:] = [str(in_r), str(out_w)]
        try:
            child, ours = procs.spawn(self.command, pass_fds=(in_r, out_w))
        except BaseException:
            for fd in (in_r, in_w, out_r, out_w):
                os.close(fd)
            raise
        os.close(in_r)
        os.close(out_w)
        self.proc = agent.adopt(child, self.command.argv, "code-context:" + self.id)
        self.requests = in_w
        if self.lines is not None:  # the last kernel's: nothing reads it from now on
            self.lines.close()
        self.lines = Lines(out_r, RESULT_LIMIT)
        for fd in (out_r, *ours.values()):
            os.set_blocking(fd, False)
        self.lines.watch()
        for name in ("stdout", "stderr"):
            loop.add_reader(ours[name], self._raw, loop, ours[name], name)
        self.executions = 0

    async def wait_ready(self) -> None:
        """Return once the kernel has loaded (IPython and all), so the next run starts at once."""
        lines = self.lines
        assert lines is not None
        while True:
            try:
                message = await aio.wait_for(lines.next(), READY_TIMEOUT)
            except TimeoutError:
                raise GuestError(
                    "context_failed", "the interpreter of context %s did not start" % self.id
                ) from None
            if message is None:
                lines.ready.put_nowait(None)  # the next execution sees the loss too
                raise GuestError(
                    "context_failed", "the interpreter of context %s exited as it started" % self.id
                )
            if isinstance(message, dict) and message.get("type") == "ready":
                return

    def _raw(self, loop: aio.Loop, fd: int, name: str) -> None:
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            os.close(fd)
        elif self.sink is not None:
            self.sink(name, data)

    def stop(self) -> None:
        """Kill the kernel and everything it started; its descriptors close as they drain."""
        if self.proc is not None and not self.proc.exited.is_set():
            tree.end_all(tree.family(self.proc.pid))
        if self.lines is not None and self.lines.paused:  # not read: its end would not be seen
            self.lines.close()
        if self.requests >= 0:
            # A request still being written (the kernel's pipe full) is woken and gives up:
            # a closed descriptor leaves the loop's epoll set without an event to wake it.
            aio.wake_writer(self.requests)
            os.close(self.requests)
            self.requests = -1
        self.proc = None

    def interrupt(self) -> None:
        if self.proc is not None and not self.proc.exited.is_set():
            try:
                os.kill(self.proc.pid, signal.SIGINT)
            except OSError:
                pass

    async def execute(
        self, agent: Any, params: Dict[str, Any], env: Dict[str, str], send: Send
    ) -> Dict[str, Any]:
        """Run `params["code"]`, streaming its messages through `send`; the summary."""
        if self.proc is None or self.proc.exited.is_set():
            self.start(agent)
        run = Execution(send)
        self.running = run
        self.sink = run.raw
        loop = aio.get_event_loop()
        timer = None
        timeout = params.get("timeout")
        if timeout is not None and timeout > 0:
            timer = loop.call_later(timeout, self._expire, run)
        request: Dict[str, Any] = {"code": params["code"], "env": env}
        if self.pooled:  # started before its sandbox was claimed: take the sandbox's settings
            request["setup"] = {"env": params.get("context_env") or {}, "cwd": params.get("cwd")}
            self.pooled = False
        # Followed while the request is written: a kernel blocked on its own output (its
        # messages not taken since the last execution) reads its requests once they are.
        assert self.lines is not None and self.proc is not None  # started above
        following = loop.create_task(run.follow(self.lines, self.proc))
        try:
            await self._write((dumps(request) + "\n").encode())
            await following
        finally:
            following.cancel()
            self.sink = None
            self.running = None
            if timer is not None:
                timer.cancel()
        if run.lost:
            await run.lose(self)
            self.stop()
            self.restarts += 1
        elif run.count is not None:
            self.executions = run.count
        return run.summary(self)

    def _expire(self, run: "Execution") -> None:
        run.timed_out = True
        self.cancel(run)

    def cancel(self, run: Optional["Execution"] = None) -> None:
        """Interrupt the execution under way (SIGINT); kill the context if it has not stopped
        INTERRUPT_GRACE later (code that catches or ignores the interrupt, or an interrupt
        that came before the code started)."""
        run = run or self.running
        if run is None:
            return
        self.interrupt()
        aio.get_event_loop().call_later(INTERRUPT_GRACE, self._kill_if_stuck, run)

    def _kill_if_stuck(self, run: "Execution") -> None:
        if not run.over and self.proc is not None:
            run.stuck = True
            tree.end_all(tree.family(self.proc.pid))

    async def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.requests, view) :]
            except BlockingIOError:
                await aio.writable(self.requests)
                if self.requests < 0:  # stopped meanwhile (`stop`)
                    return
            except OSError:  # the kernel is gone: follow() sees its end
                return


class Contexts:
    """The sandbox's code contexts, by id; a default one per language made on first use."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.by_id: Dict[str, Context] = {}
        self.next_id = 1

    def create(self, params: Dict[str, Any], context_id: Optional[str] = None) -> Context:
        if len(self.by_id) >= MAX_CONTEXTS:
            raise GuestError(
                "limit_reached",
                "the sandbox has %d code contexts, the most it may; remove one" % MAX_CONTEXTS,
            )
        if context_id is None:
            context_id = "ctx-%d" % self.next_id
            self.next_id += 1
        context = Context(context_id, params, self.agent.base_env)
        context.start(self.agent)
        self.by_id[context.id] = context
        return context

    def find(self, params: Dict[str, Any]) -> Context:
        wanted = params.get("context")
        if wanted is None:
            language = str(params.get("language") or "python")
            if language not in KERNELS:
                check_language(language, None)  # raises, with the list
            default = self.by_id.get(language)
            if default is None:
                start = {"language": language, "cwd": params.get("cwd")}
                default = self.create(dict(start, env=params.get("context_env")), language)
            return default
        context = self.by_id.get(str(wanted))
        if context is None:
            raise GuestError("context_not_found", "no code context %r in this sandbox" % (wanted,))
        asked = params.get("language")
        if asked is not None and asked != context.language:
            raise GuestError(
                "invalid_request",
                "context %s runs %s, not %s" % (context.id, context.language, asked),
            )
        return context

    def remove(self, context: Context) -> None:
        context.stop()
        self.by_id.pop(context.id, None)


# -- the agent's handlers --------------------------------------------------------------------


async def code_run(agent: Any, stream: Any, params: Dict[str, Any]) -> Dict[str, Any]:
    code = params.get("code")
    if not isinstance(code, str):
        raise GuestError("invalid_request", "code must be a string")
    env = params.get("env") or {}
    timeout = params.get("timeout")
    if not isinstance(env, dict) or not (timeout is None or isinstance(timeout, (int, float))):
        raise GuestError("invalid_request", "env must be an object and timeout a number")
    context: Context = agent.contexts.find(params)

    async def send(message: Dict[str, Any]) -> None:
        """One message as a JSON line in FILE frames: under the stream's credit, so a host that
        reads slowly slows the code's output down rather than filling memory."""
        line = (dumps(message) + "\n").encode()
        for start in range(0, len(line), P.CHUNK):
            if stream.cancelled:
                return
            try:
                await stream.send_data(P.FILE, line[start : start + P.CHUNK])
            except OSError:  # the host went away: the code runs on, its output is dropped
                stream.cancelled = True

    async def on_cancel() -> None:
        await stream.incoming.get()  # None: the host cancelled, or the connection ended
        if not stream.detached:  # a checkpoint's pause of the connection is no reason
            context.cancel()

    async with context.lock:
        watch = aio.get_event_loop().create_task(on_cancel())
        try:
            await send({"type": "started", "context": context.id})
            env = {str(k): str(v) for k, v in env.items()}
            return await context.execute(agent, params, env, send)
        finally:
            watch.cancel()


async def code_create(agent: Any, stream: Any, params: Dict[str, Any]) -> Dict[str, Any]:
    contexts: Contexts = agent.contexts
    language = str(params.get("language") or "python")
    default = language if params.get("pooled") else None  # a warm pool's default context
    context = contexts.create(params, default)
    await context.wait_ready()
    return context.describe()


async def code_list(agent: Any, stream: Any, params: Dict[str, Any]) -> List[Dict[str, Any]]:
    return [context.describe() for context in agent.contexts.by_id.values()]


async def code_restart(agent: Any, stream: Any, params: Dict[str, Any]) -> Dict[str, Any]:
    context: Context = agent.contexts.find({"context": params.get("context")})
    context.stop()  # a running execution sees its kernel go, reports it lost and restarts it
    async with context.lock:
        if context.proc is None:
            context.start(agent)
            await context.wait_ready()
        context.restarts += 1
    return context.describe()


async def code_remove(agent: Any, stream: Any, params: Dict[str, Any]) -> Dict[str, Any]:
    contexts: Contexts = agent.contexts
    context = contexts.find({"context": params.get("context")})
    contexts.remove(context)
    return {"id": context.id, "removed": True}
