"""The guest agent: the supervisor inside every sandbox that does what the host asks.

It dials the host's Unix socket (in /run/corral/sock), proves with its HELLO that it holds the
sandbox's secret (see `protocol`) and serves CALLs:
start processes and stream their output, write their stdin, signal them; read, write and manage
files. It re-dials whenever the connection drops, so a restarted host (or a restored checkpoint)
finds it again; running processes are unaffected by a lost connection.

Standard library only, and written for any Python ≥ 3.8, so it runs in any image with a Python.
Every path it receives is resolved here, inside the sandbox's own root: `..` and symlinks are
interpreted by the sandbox's filesystem and cannot name anything on the host.

It runs as the sandbox's pid 1, non-dumpable, handling every signal it can (see `shield.harden`).

Started by start.py (`python3 -I -S start.py SOCKET_DIR`), which imports it compiled.
"""

from __future__ import annotations

import errno
import os
import sys
import time

try:
    from corral.agent import (
        aio,
        aiostreams,
        aiosync,
        contexts,
        fileops,
        lean,
        memory,
        ports,
        procs,
        shield,
        tree,
    )
    from corral.agent import protocol as P
    from corral.agent.fileops import GuestError
    from corral.agent.procs import Proc
except ImportError:  # inside the sandbox the agent directory itself is on sys.path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import aio  # type: ignore[import-not-found,no-redef]
    import aiostreams  # type: ignore[import-not-found,no-redef]
    import aiosync  # type: ignore[import-not-found,no-redef]
    import contexts  # type: ignore[import-not-found,no-redef]
    import fileops  # type: ignore[import-not-found,no-redef]
    import lean  # type: ignore[import-not-found,no-redef]
    import memory  # type: ignore[import-not-found,no-redef]
    import ports  # type: ignore[import-not-found,no-redef]
    import procs  # type: ignore[import-not-found,no-redef]
    import protocol as P  # type: ignore[import-not-found,no-redef]
    import shield  # type: ignore[import-not-found,no-redef]
    import tree  # type: ignore[import-not-found,no-redef]
    from fileops import GuestError  # type: ignore[no-redef]
    from procs import Proc  # type: ignore[no-redef]

TYPE_CHECKING = False  # `typing` is for annotations only: 2 ms of every agent's start (aio)
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional

REDIAL_DELAY = 0.05
DRAIN_AFTER_EXIT = 0.2
DRAIN_LIMIT = 1.0  # see `Agent.pump`
PTY_BACKLOG = 256 * 1024  # over gVisor's 128 KiB wait buffer and 4 KiB line (Linux 6.18: 12 KiB)
MAX_LIST_ENTRIES = 100_000
KEEP_EXITED = 64
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Stream:
    """One CALL's stream on the current connection: credit for what we send, data we receive."""

    def __init__(self, agent: "Agent", stream_id: int) -> None:
        self.agent = agent
        self.id = stream_id
        self.window = P.WINDOW_INITIAL
        self.window_open = aiosync.Event()
        self.window_open.set()
        self.incoming: "aiosync.Queue[Optional[bytes]]" = aiosync.Queue()
        self.cancelled = False
        self.detached = False
        self.on_input: Optional[Any] = None  # callback for STDIN frames (processes)

    def grant(self, amount: int) -> None:
        self.window += amount
        if self.window > 0:
            self.window_open.set()

    async def send_data(self, kind: int, data: bytes) -> None:
        """Send `data` once the host has given credit; drop it once the host has gone."""
        while self.window <= 0 and not self.detached and not self.cancelled:
            self.window_open.clear()
            await self.window_open.wait()
        if self.detached or self.cancelled:  # no host will read this stream (further)
            return
        self.window -= len(data)
        await self.agent.send(P.encode(self.id, kind, data))

    async def event(self, message: Dict[str, Any]) -> None:
        await self.agent.send(P.encode_json(self.id, P.EVENT, message))

    async def read_input(self) -> Optional[bytes]:
        """The next chunk of FILE data from the host, or None at EOF; returns credit for it."""
        chunk = await self.incoming.get()
        if chunk:
            await self.agent.send(P.encode(self.id, P.WINDOW_UPDATE, P.WINDOW.pack(len(chunk))))
        return chunk


class Agent:
    def __init__(self, socket_dir: str, secret: bytes, memory_budget: int = 0) -> None:
        self.socket_dir = socket_dir
        self.socket_path = os.path.join(socket_dir, P.socket_name(secret))
        self.guard = memory.Guard(memory_budget) if memory_budget > 0 else None
        self.secret = secret
        self.loop = aio.get_event_loop()
        self.writer: Optional[aiostreams.StreamWriter] = None
        self.write_lock = aiosync.Lock()
        self.streams: Dict[int, Stream] = {}
        self.procs: Dict[int, Proc] = {}
        self.by_pid: Dict[int, Proc] = {}
        self.next_proc_id = 1
        self.base_env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_AGENT_")}
        self.base_env.setdefault("PATH", DEFAULT_PATH)
        self.contexts = contexts.Contexts(self)

    # -- connection -------------------------------------------------------------------------

    async def run(self) -> None:
        self.loop.add_signal_handler(lean.signal.SIGCHLD, self.reap)
        if self.guard is not None:
            self.loop.create_task(self.guard.watch(self.blame, lambda: bool(self.by_pid)))
        while True:
            try:
                reader, writer = await aiostreams.open_unix_connection(self.socket_path)
            except OSError:
                await aio.sleep(REDIAL_DELAY)
                continue
            self.writer = writer
            try:
                await self.hello(reader)
                await self.serve(reader)
            except (OSError, EOFError, aio.IncompleteReadError, P.ProtocolError):
                pass
            finally:
                self.writer = None
                writer.close()
                # The host's streams end with the connection; their processes do not. A pump
                # waiting for credit is woken, so it goes on draining the process's output
                # (and dropping it) rather than leaving the process blocked on a full pipe.
                for stream in self.streams.values():
                    stream.detached = True
                    stream.cancelled = True
                    stream.incoming.put_nowait(None)
                    stream.window_open.set()
                self.streams = {}
            await aio.sleep(REDIAL_DELAY)

    async def hello(self, reader: aiostreams.StreamReader) -> None:
        """Answer the host's CHALLENGE, proving this is the sandbox's agent."""
        length, _stream, kind = P.decode_header(await reader.readexactly(P.HEADER.size))
        if kind != P.CHALLENGE or length > 1024:
            raise P.ProtocolError("the host did not open with a challenge")
        challenge = await reader.readexactly(length)
        message = {
            "version": P.VERSION,
            "pid": os.getpid(),
            "python": "%d.%d.%d" % sys.version_info[:3],
            "proof": P.proof(self.secret, challenge),
        }
        await self.send(P.encode_json(0, P.HELLO, message))

    async def send(self, frame: bytes) -> None:
        writer = self.writer
        if writer is None:
            raise ConnectionResetError("not connected")
        async with self.write_lock:
            writer.write(frame)
            await writer.drain()

    async def serve(self, reader: aiostreams.StreamReader) -> None:
        while True:
            header = await reader.readexactly(P.HEADER.size)
            length, stream_id, kind = P.decode_header(header)
            payload = await reader.readexactly(length) if length else b""
            if kind == P.CALL:
                message = P.decode_json(payload)
                stream = Stream(self, stream_id)
                self.streams[stream_id] = stream
                self.loop.create_task(self.dispatch(stream, message))
            elif kind == P.QUIESCE:
                return
            else:
                target = self.streams.get(stream_id)
                if target is None:
                    continue
                if kind == P.WINDOW_UPDATE:
                    target.grant(P.WINDOW.unpack(payload)[0])
                elif kind == P.CANCEL:
                    target.cancelled = True
                    target.incoming.put_nowait(None)
                    target.window_open.set()
                elif kind == P.STDIN and target.on_input is not None:
                    target.on_input(payload)
                elif kind == P.FILE:
                    target.incoming.put_nowait(payload)
                elif kind == P.EOF:
                    if target.on_input is not None:
                        target.on_input(None)
                    else:
                        target.incoming.put_nowait(None)

    async def dispatch(self, stream: Stream, message: Dict[str, Any]) -> None:
        method = message.get("method")
        params = message.get("params") or {}
        name = method if isinstance(method, str) else ""
        try:
            if not isinstance(params, dict):
                raise GuestError("invalid_request", "params must be an object")
            if name in HANDLERS:
                result = await HANDLERS[name](self, stream, params)
            elif name in FILE_HANDLERS:
                result = await FILE_HANDLERS[name](stream, params)
            else:
                raise GuestError("unknown_method", "unknown method %r" % (method,))
            reply: Dict[str, Any] = {"result": result}
        except GuestError as exc:
            reply = {"error": {"code": exc.code, "message": exc.message}}
        except OSError as exc:
            reply = {
                "error": {
                    "code": errno.errorcode.get(exc.errno or 0, "EIO"),
                    "message": "%s: %s" % (exc.filename or method, exc.strerror),
                }
            }
        except Exception as exc:  # a bug here must not take the agent down
            reply = {
                "error": {"code": "agent_error", "message": "%s: %s" % (type(exc).__name__, exc)}
            }
        self.streams.pop(stream.id, None)
        if not stream.detached:
            try:
                await self.send(P.encode_reply(stream.id, reply))
            except OSError:
                pass

    # -- processes --------------------------------------------------------------------------

    def blame(self, pid: int) -> None:
        """Mark the command `pid` belongs to as killed for the sandbox's memory."""
        table = tree.scan()
        for proc in self.procs.values():
            if not proc.exited.is_set() and pid in tree.family(proc.pid)(table):
                proc.oom_killed = True

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            proc = self.by_pid.pop(pid, None)
            if proc is not None:
                proc.status = status
                proc.child.returncode = status  # stop Popen from waiting on a reaped child
                proc.exited.set()

    async def readable(self, fd: int, proc: Proc, deadline: Optional[float]) -> bool:
        """Wait until `fd` has data (False: the process exited first); once it has exited
        (`deadline` set), for DRAIN_AFTER_EXIT at most, and never past `deadline`."""
        future = self.loop.create_future()
        self.loop.add_reader(fd, aio.release, future, True)
        try:
            if deadline is None:
                exit_wait = self.loop.create_task(proc.exited.wait())
                done, _ = await aio.wait([future, exit_wait], return_when=aio.FIRST_COMPLETED)
                exit_wait.cancel()
                return future in done
            left = min(DRAIN_AFTER_EXIT, deadline - time.monotonic())
            return left > 0 and bool((await aio.wait([future], timeout=left))[0])
        finally:
            self.loop.remove_reader(fd)

    async def pump(self, stream: Stream, proc: Proc, fd: int, kind: int) -> None:
        """Send what `fd` gives to the host until its end. Once the process has exited: what
        `fd` held then, however long the host takes it (a terminal holds up to PTY_BACKLOG
        more than FIONREAD counts: read on until it has no more), then what comes within
        DRAIN_AFTER_EXIT of the last read, until DRAIN_LIMIT after the exit. So a process left
        running in the background, writing on, does not hold the command open (its writes
        then fail, as into a closed pipe)."""
        held, deadline = 0, None  # bytes `fd` held at the exit, read whatever the wait
        try:
            while True:
                if deadline is None and proc.exited.is_set():
                    held = procs.queued(fd) + (PTY_BACKLOG if proc.pty_fd is not None else 0)
                    deadline = time.monotonic() + DRAIN_LIMIT
                if held <= 0 and not await self.readable(fd, proc, deadline):
                    if deadline is None:
                        continue  # the process exited: what is left is read as above
                    break
                try:
                    data = os.read(fd, P.CHUNK)
                except BlockingIOError:  # all it held is read
                    held = 0
                    continue
                except OSError:  # EIO: the PTY's other side is closed
                    break
                if not data:
                    break
                held -= len(data)
                if not stream.cancelled:
                    try:
                        await stream.send_data(kind, data)
                    except OSError:  # the connection broke mid-send: keep draining, drop
                        stream.cancelled = True
        finally:
            os.close(fd)

    def adopt(self, child: Any, argv: List[str], tag: str) -> Proc:
        """Keep a process just started: listed, reaped, and blamed for memory like the rest."""
        proc = Proc(self.next_proc_id, child, argv, tag)
        self.next_proc_id += 1
        self.procs[proc.id] = proc
        self.by_pid[proc.pid] = proc
        self.reap()  # it may already have exited before the handler was registered for it
        return proc

    async def proc_start(self, stream: Stream, params: Dict[str, Any]) -> Dict[str, Any]:
        command = procs.Command(params, self.base_env)
        child, ours = procs.spawn(command)
        proc = self.adopt(child, command.argv, command.tag)
        for fd in ours.values():
            os.set_blocking(fd, False)
        proc.pty_fd = ours.get("pty")
        proc.stdin_fd = ours.get("stdin", proc.pty_fd)
        stream.on_input = lambda data: self.loop.create_task(self.feed_stdin(proc, stream, data))
        timer = None
        if isinstance(command.timeout, (int, float)) and command.timeout > 0:

            def expire() -> None:
                if not proc.exited.is_set():
                    proc.timed_out = True
                    tree.end_all(tree.family(proc.pid))

            timer = self.loop.call_later(float(command.timeout), expire)
        try:
            await stream.event({"type": "started", "id": proc.id, "pid": proc.pid})
        except OSError:  # the host went away: the process runs on, its output is drained
            stream.cancelled = True
        try:
            await self.drain(stream, proc, ours)
        finally:
            if timer is not None:
                timer.cancel()
            # What is still open (an end of input closed a pipe's stdin already): a STDIN frame
            # waiting on it gives up, and the loop no longer watches a number that is reused.
            leftovers = {fd for fd in (proc.pty_fd, proc.stdin_fd) if fd is not None}
            proc.stdin_fd = proc.pty_fd = None
            for leftover in leftovers:
                aio.wake_writer(leftover)
                try:
                    os.close(leftover)
                except OSError:
                    pass
            self.forget_old()
        return proc.result()

    async def drain(self, stream: Stream, proc: Proc, ours: Dict[str, int]) -> None:
        """Pump the process's output to the host until it ends and has exited."""
        if proc.pty_fd is not None:
            pumps = [self.pump(stream, proc, os.dup(proc.pty_fd), P.STDOUT)]
        else:
            pumps = [
                self.pump(stream, proc, ours["stdout"], P.STDOUT),
                self.pump(stream, proc, ours["stderr"], P.STDERR),
            ]
        await aio.gather(*pumps)
        await proc.exited.wait()

    async def feed_stdin(self, proc: Proc, stream: Stream, data: Optional[bytes]) -> None:
        """One STDIN frame (None: the end of input), then the host's credit back for it."""
        if await proc.feed(data) and data and not stream.detached:
            try:
                await self.send(P.encode(stream.id, P.WINDOW_UPDATE, P.WINDOW.pack(len(data))))
            except OSError:
                pass

    def forget_old(self) -> None:
        exited = [p for p in self.procs.values() if p.exited.is_set()]
        for proc in exited[:-KEEP_EXITED]:
            del self.procs[proc.id]

    def find_proc(self, params: Dict[str, Any]) -> Proc:
        proc = self.procs.get(params.get("id"))  # type: ignore[arg-type]
        if proc is None:
            raise GuestError("process_not_found", "no process with id %r" % (params.get("id"),))
        return proc

    async def proc_signal(self, stream: Stream, params: Dict[str, Any]) -> Dict[str, Any]:
        proc = self.find_proc(params)
        sig = params.get("signal", "SIGKILL")
        try:  # a name is one of the signals' own ("SIGTERM"), never any attribute of `signal`
            signum = lean.signal_number(sig)
        except ValueError:
            raise GuestError("invalid_request", "unknown signal %r" % (sig,)) from None
        if signum == lean.signal.SIGKILL and not proc.exited.is_set():
            tree.end_all(tree.family(proc.pid))  # everything the command started goes with it
        elif not proc.exited.is_set():
            proc.kill_group(signum)
        return {"id": proc.id, "running": not proc.exited.is_set()}

    async def proc_kill_all(self, stream: Stream, params: Dict[str, Any]) -> Dict[str, Any]:
        return {"killed": tree.end_all(tree.everyone)}

    async def proc_resize(self, stream: Stream, params: Dict[str, Any]) -> Dict[str, Any]:
        proc = self.find_proc(params)
        if proc.pty_fd is None:
            raise GuestError("invalid_request", "process %d has no terminal to resize" % proc.id)
        rows, cols = int(params.get("rows", 24)), int(params.get("cols", 80))
        if not (0 < rows < 10000 and 0 < cols < 10000):
            raise GuestError("invalid_request", "rows and cols must be between 1 and 9999")
        procs.set_size(proc.pty_fd, rows, cols)
        return {"id": proc.id, "rows": rows, "cols": cols}

    async def proc_list(self, stream: Stream, params: Dict[str, Any]) -> List[Dict[str, Any]]:
        return [proc.describe() for proc in self.procs.values()]

    async def ping(self, stream: Stream, params: Dict[str, Any]) -> Dict[str, Any]:
        return {"pong": True, "time": time.time(), "others": len(tree.everyone(tree.scan()))}

    async def identify(self, stream: Stream, params: Dict[str, Any]) -> Dict[str, Any]:
        """Become a sandbox restored from a boot image (see `shield.take_identity`)."""
        try:
            self.secret = shield.take_identity(params.get("hostname"), params.get("secret"))
        except ValueError as exc:
            raise GuestError("invalid_request", str(exc)) from None
        self.socket_path = os.path.join(self.socket_dir, P.socket_name(self.secret))
        return {"hostname": params["hostname"]}


HANDLERS = {
    P.PING: Agent.ping,
    P.IDENTIFY: Agent.identify,
    P.PROC_START: Agent.proc_start,
    P.PROC_SIGNAL: Agent.proc_signal,
    P.PROC_RESIZE: Agent.proc_resize,
    P.PROC_LIST: Agent.proc_list,
    P.PROC_KILL_ALL: Agent.proc_kill_all,
    P.CODE_RUN: contexts.code_run,
    P.CODE_CREATE: contexts.code_create,
    P.CODE_LIST: contexts.code_list,
    P.CODE_RESTART: contexts.code_restart,
    P.CODE_REMOVE: contexts.code_remove,
}
FILE_HANDLERS = {
    P.FS_READ: fileops.fs_read,
    P.FS_WRITE: fileops.fs_write,
    P.FS_STAT: fileops.fs_stat,
    P.FS_LIST: fileops.fs_list,
    P.FS_MKDIR: fileops.fs_mkdir,
    P.FS_REMOVE: fileops.fs_remove,
    P.FS_RENAME: fileops.fs_rename,
    P.FS_CHMOD: fileops.fs_chmod,
    P.PORT_CONNECT: ports.port_connect,
}


def read_secret(socket_dir: str) -> bytes:
    """The sandbox's secret, from the file the host deletes once the agent has proved it."""
    with open(os.path.join(socket_dir, P.KEY_NAME), "rb") as handle:
        return bytes.fromhex(handle.read().decode().strip())


def main() -> None:
    args = sys.argv[1:]
    if len(args) not in (1, 2) or (len(args) == 2 and not args[1].isdigit()):
        sys.stderr.write("usage: start.py SOCKET_DIR [MEMORY_BUDGET_BYTES]\n")
        sys.exit(2)
    socket_dir = args[0]
    budget = int(args[1]) if len(args) == 2 else 0
    shield.harden()
    try:
        secret = read_secret(socket_dir)
    except (OSError, ValueError) as exc:
        sys.stderr.write("corral agent: cannot read the sandbox's key: %s\n" % (exc,))
        sys.exit(3)
    shield.quiet()
    procs.starter()
    aio.get_event_loop().run_until_complete(Agent(socket_dir, secret, budget).run())
