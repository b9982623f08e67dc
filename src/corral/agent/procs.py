"""Processes the guest agent starts for the host: how a request becomes a child process (its
argv, working directory, environment, user, terminal or pipes), and what is kept of it.

Standard library only, for any Python >= 3.8, like the rest of the agent.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pwd
import struct
import time

try:
    from corral.agent import aio, aiosync
    from corral.agent.fileops import GuestError
    from corral.agent.lean import signal
    from corral.agent.shell import find_program, plain, refuse_what_is_not_a_file
    from corral.agent.tree import PR_SET_CHILD_SUBREAPER
except ImportError:  # inside the sandbox the agent directory itself is on sys.path
    import aio  # type: ignore[import-not-found,no-redef]
    import aiosync  # type: ignore[import-not-found,no-redef]
    from fileops import GuestError  # type: ignore[import-not-found,no-redef]
    from lean import signal  # type: ignore[import-not-found,no-redef]
    from shell import (  # type: ignore[import-not-found,no-redef]
        find_program,
        plain,
        refuse_what_is_not_a_file,
    )
    from tree import PR_SET_CHILD_SUBREAPER  # type: ignore[import-not-found,no-redef]

TYPE_CHECKING = False  # `typing` is for annotations only: 2 ms of every agent's start (aio)
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional, Tuple

    Stdio = Tuple[Optional[int], int, int]  # a command's descriptors 0 to 2 (None: /dev/null)

# The program every command starts through where the host built it (see `spawn`), and the same
# steps as a library the agent calls instead where the host could build that too (leader.c):
# LIBRARY names it (engine.datadir.build_leader).
LEADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "leader")
LIBRARY = LEADER + ".lib"
# termios.FIONREAD on x86-64 and arm64, the hosts Corral runs on, without importing `termios`
# at every command's end (a first command's time); tests/unit/test_agent_pump.py checks it.
FIONREAD = 0x541B
SPAWNS = [True]  # emptied once posix_spawn has said it cannot start a session here
STARTERS: Dict[str, Any] = {}  # LIBRARY's corral_spawn once loaded, None where it cannot be


class Proc:
    """A process started by the host."""

    def __init__(self, proc_id: int, child: Child, argv: List[str], tag: str) -> None:
        self.id = proc_id
        self.child = child
        self.pid = child.pid
        self.argv = argv
        self.tag = tag
        self.exited = aiosync.Event()
        self.stdin_turn = aiosync.Lock()  # STDIN frames are written one after another
        self.status: Optional[int] = None
        self.timed_out = False
        self.oom_killed = False  # by the agent's memory guard (see `memory`)
        self.stdin_fd: Optional[int] = None
        self.pty_fd: Optional[int] = None
        self.started = time.time()

    def result(self) -> Dict[str, Any]:
        status = self.status or 0
        exit_code = None
        sig = None
        if os.WIFEXITED(status):
            exit_code = os.WEXITSTATUS(status)
        elif os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            exit_code = 128 + sig
        return {
            "id": self.id,
            "pid": self.pid,
            "exit_code": exit_code,
            "signal": sig,
            "timed_out": self.timed_out,
            "oom_killed": self.oom_killed,
        }

    def describe(self) -> Dict[str, Any]:
        info = {
            "id": self.id,
            "pid": self.pid,
            "tag": self.tag,
            "argv": self.argv,
            "running": not self.exited.is_set(),
            "started_at": self.started,
        }
        if self.exited.is_set():
            info.update(self.result())
        return info

    async def feed(self, data: Optional[bytes]) -> bool:
        """Write one STDIN frame (None: the end of input) after the frames before it: one that
        came while the pipe was full waits its turn, and the end of input comes after them
        all. False where there was no input left to write to (closed, or the command gone)."""
        async with self.stdin_turn:
            fd = self.stdin_fd
            if fd is None:
                return False
            if data is None:
                if fd != self.pty_fd:
                    self.stdin_fd = None
                    os.close(fd)
                    return True
                data = b"\x04"  # end of input on a terminal is ^D, not a closed descriptor
            view = memoryview(data)
            while view:
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:
                    await aio.writable(fd)
                    if self.stdin_fd is None:  # the command ended meanwhile: fd is closed
                        break
                except OSError:  # the process closed its stdin or exited
                    break
            return True

    def kill_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except OSError:
            try:
                os.kill(self.pid, sig)
            except OSError:
                pass


class Command:
    """A process as the host asked for it, checked: argv, cwd, env, user, terminal, stdin."""

    def __init__(self, params: Dict[str, Any], base_env: Dict[str, str]) -> None:
        argv = params.get("argv")
        cmd = params.get("cmd")
        if cmd is not None:
            if not isinstance(cmd, str) or "\0" in cmd:
                raise GuestError("invalid_request", "cmd must be a string without NUL bytes")
            shell = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
            argv = [shell, "-c", cmd]
        if (
            not isinstance(argv, list)
            or not argv
            or not all(isinstance(a, str) and "\0" not in a for a in argv)
        ):
            raise GuestError(
                "invalid_request", "argv must be a non-empty list of strings without NUL"
            )
        self.argv: List[str] = argv  # as asked, and as listed
        self.direct: Optional[List[str]] = None  # a plain `cmd`, run without its shell
        self.cwd = params.get("cwd") or base_env.get("HOME") or "/"
        if not isinstance(self.cwd, str) or not self.cwd.startswith("/") or "\0" in self.cwd:
            raise GuestError("invalid_cwd", "cwd must be an absolute path")
        if not os.path.isdir(self.cwd):
            raise GuestError(
                "invalid_cwd", "working directory %s does not exist in the sandbox" % self.cwd
            )
        self.user = resolve_user(params.get("user"))
        self.env = dict(base_env)
        if self.user is not None:
            name = self.user.pw_name
            self.env.update(HOME=self.user.pw_dir, USER=name, LOGNAME=name)
        extra_env = params.get("env") or {}
        if not isinstance(extra_env, dict):
            raise GuestError("invalid_request", "env must be an object")
        self.env.update({str(k): str(v) for k, v in extra_env.items()})
        if cmd is not None:
            self.direct = plain(cmd, self.env, self.cwd)
        pty = params.get("pty")
        self.pty: Optional[Dict[str, Any]] = pty if isinstance(pty, dict) else None
        self.stdin = bool(params.get("stdin"))
        self.timeout = params.get("timeout")
        self.tag = str(params.get("tag") or "")

    @property
    def runs(self) -> List[str]:
        """What is executed: `argv`, or for a plain `cmd` its words (see `plain`)."""
        return self.direct or self.argv


def resolve_user(user: Any) -> Optional[pwd.struct_passwd]:
    if user in (None, "", 0, "root"):
        return None
    try:
        return pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(str(user))
    except KeyError:
        raise GuestError(
            "invalid_user", "user %r does not exist in this sandbox" % (user,)
        ) from None


def spawn(command: Command, pass_fds: Tuple[int, ...] = ()) -> Tuple[Child, Dict[str, int]]:
    """Start `command` in a session of its own, as a child subreaper (see `tree`); the process
    and the agent's ends of its terminal ("pty") or pipes ("stdout", "stderr", "stdin").
    `pass_fds` stay open in the process, under the same numbers.

    The command starts through `leader` (leader.c, built by the host) where it is there, with
    `posix_spawn` (a vfork: forking the whole agent takes tens of milliseconds under gVisor,
    and `subprocess` is 0.6 MiB of every idle agent's memory). Without it, Python's
    `subprocess` forks and does the same in the child (`_fork`)."""
    refuse_what_is_not_a_file(command.runs[0], command.cwd)
    child_fds: List[int] = []
    ours: Dict[str, int] = {}
    try:
        if command.pty:
            stdio = _terminal(command, child_fds, ours)
        else:
            stdio = _pipes(command, child_fds, ours)
        child = None
        if SPAWNS and os.access(LEADER, os.X_OK):
            try:
                child = _lead(command, stdio, pass_fds)
            except NotImplementedError:  # a C library without POSIX_SPAWN_SETSID (glibc < 2.26)
                SPAWNS.clear()
        if child is None:
            child = _fork(command, stdio, pass_fds)
    except BaseException:
        for fd in list(ours.values()):
            os.close(fd)
        raise
    finally:
        for fd in child_fds:
            os.close(fd)
    return child, ours


class Child:
    """A process the agent started: what the agent uses of a `subprocess.Popen`."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: Optional[int] = None  # its wait status, once reaped

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = os.waitpid(self.pid, 0)[1]
        return self.returncode


def _lead(command: Command, stdio: Stdio, pass_fds: Tuple[int, ...]) -> Child:
    """Start `command` through `LEADER`; raise what it reports before the command runs."""
    program = find_program(command.runs[0], command.env, command.cwd)
    uid = gid = -1
    groups = "-"
    if command.user is not None:
        uid, gid = command.user.pw_uid, command.user.pw_gid
        groups = ",".join(str(g) for g in os.getgrouplist(command.user.pw_name, gid))
    err_r, err_w = os.pipe()
    try:
        keep = "%d:%s" % (err_w, ",".join(str(fd) for fd in sorted(pass_fds)))  # see leader.c
        options = [keep, "1" if command.pty else "0", str(uid), str(gid), groups]
        argv = [LEADER, *options, program, *command.runs]
        child = _posix_spawn(argv, command, stdio, (*pass_fds, err_w))
        os.close(err_w)
        err_w = -1
        report = _read_all(err_r)  # closed by the command's exec, or its failure reported
    finally:
        os.close(err_r)
        if err_w >= 0:
            os.close(err_w)
    if len(report) == 8:
        child.wait()
        step, code = struct.unpack("ii", report)
        raise _failure(step, code, command.runs[0])
    return child


def _posix_spawn(argv: List[str], command: Command, stdio: Stdio, keep: Tuple[int, ...]) -> Child:
    """Start `argv` in `command.cwd` with its env, in a session of its own, with `stdio` as its
    descriptors 0 to 2 and `keep` open under their numbers; nothing else of the agent's.

    With `LIBRARY` the leader's steps run in the vfork child itself (`_clone`), which saves the
    command an exec (under gVisor 6 to 10 ms of every command); without it, or for a command
    run as another user, `posix_spawn` starts the leader program. Either way only what is
    close-on-exec is closed at first: every descriptor the agent opens is (Python's default),
    `keep` is made inheritable only for this call (the agent runs one thing at a time), and the
    leader's steps close the rest but what they are told to keep. Neither has a working
    directory of its own, so the agent moves to the command's for the call."""
    for fd in keep:
        os.set_inheritable(fd, True)
    here = -1
    try:
        here = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.chdir(command.cwd)
        except OSError as exc:
            message = "cannot enter %s: %s" % (command.cwd, exc.strerror)
            raise GuestError("invalid_cwd", message) from None
        # Not for a command run as another user: between its setresuid and its exec the child,
        # still on the agent's memory, could be stopped by that user's processes, and the agent
        # with it (a vfork parent waits for its child's exec). The program drops the user in a
        # process of its own.
        user = command.user
        start = starter() if user is None or user.pw_uid == os.geteuid() else None
        if start is not None:
            pid = _clone(start, argv, command.env, stdio)
        else:
            actions: List[Tuple[Any, ...]] = []
            for target, given in enumerate(stdio):
                if given is None:
                    actions.append((os.POSIX_SPAWN_OPEN, target, os.devnull, os.O_RDWR, 0))
                else:
                    actions.append((os.POSIX_SPAWN_DUP2, given, target))
            pid = os.posix_spawn(
                argv[0],
                argv,
                command.env,
                file_actions=actions,
                setsid=True,
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),  # what Python set aside, as Popen
            )
    except OSError as exc:
        raise _failure(EXEC, exc.errno or errno.EIO, command.runs[0]) from None
    finally:
        if here >= 0:  # back where the agent was, before anything else can fail
            os.fchdir(here)
            os.close(here)
        for fd in keep:
            os.set_inheritable(fd, False)
    return Child(pid)


def starter() -> Any:
    """`LIBRARY`'s `corral_spawn`, loaded once (at the agent's start, `guest.main`: under gVisor
    the load takes about 10 ms, which no command should wait for); None where it is not there
    (not built: no C compiler, not x86-64) or cannot be loaded, and the leader program serves."""
    if LIBRARY not in STARTERS:
        start = None
        try:
            with open(LIBRARY) as pointer:
                name = pointer.read(64)
        except OSError:
            name = ""
        if name.startswith("leader-") and name.endswith(".so") and "/" not in name:
            import ctypes  # noqa: PLC0415 - loaded already (shield.harden)

            path = os.path.join(os.path.dirname(LIBRARY), name)
            try:
                start = ctypes.PyDLL(path).corral_spawn  # PyDLL: the GIL held, one at a time
            except (OSError, AttributeError):
                start = None
            else:
                strings = ctypes.POINTER(ctypes.c_char_p)
                start.argtypes = (strings, strings, ctypes.POINTER(ctypes.c_int))
                start.restype = ctypes.c_long
        STARTERS[LIBRARY] = start
    return STARTERS[LIBRARY]


def _clone(start: Any, argv: List[str], env: Dict[str, str], stdio: Stdio) -> int:
    """Start the leader's steps for `argv` through the library (see `_posix_spawn`): the pid.
    The same refusals as `os.posix_spawn` for what C strings cannot carry."""
    import ctypes  # noqa: PLC0415 - loaded already (shield.harden)

    args = [os.fsencode(a) for a in argv]
    pairs = []
    for key, value in env.items():
        if not key or "=" in key:
            raise ValueError("illegal environment variable name")
        pairs.append(os.fsencode(key) + b"=" + os.fsencode(value))
    if any(b"\0" in item for item in args + pairs):
        raise ValueError("embedded null byte")
    fds = (ctypes.c_int * 3)(*(-1 if fd is None else fd for fd in stdio))
    pid = start(
        (ctypes.c_char_p * (len(args) + 1))(*args),
        (ctypes.c_char_p * (len(pairs) + 1))(*pairs),
        fds,
    )
    if pid < 0:
        raise OSError(-pid, os.strerror(-pid))
    return int(pid)


def _read_all(fd: int) -> bytes:
    data = b""
    while True:
        chunk = os.read(fd, 64)
        if not chunk:
            return data
        data += chunk


LEADER_STEPS = {1: "become a subreaper", 2: "take its terminal", 3: "set its groups"}
LEADER_STEPS.update({4: "set its group", 5: "become its user", 6: "run", 7: "start"})
LEADER_STEPS.update({8: "close the agent's descriptors for", 9: "start a session for"})
LEADER_STEPS[10] = "open the standard streams of"
EXEC = 6


def _failure(step: int, code: int, name: str) -> GuestError:
    """What the host is told when `name` could not start, at `step` (LEADER_STEPS)."""
    if step == EXEC and code in (errno.ENOENT, errno.ENOTDIR):
        return GuestError("command_not_found", "command not found: %s" % name)
    if step == EXEC and code == errno.EACCES:
        return GuestError("EACCES", "permission denied: %s" % name)
    if code == errno.EAGAIN:
        return GuestError(
            "limit_reached", "cannot start %s: the sandbox is at its process limit" % name
        )
    what = LEADER_STEPS.get(step, "start")
    message = "cannot %s %s: %s" % (what, name, os.strerror(code))
    return GuestError(errno.errorcode.get(code, "EIO"), message)


def _fork(command: Command, stdio: Stdio, keep: Tuple[int, ...]) -> Any:
    """Start `command` the slow way, without `LEADER`: Python's `subprocess` forks the agent,
    and the child keeps what it starts in its tree and takes its terminal before the exec."""
    import ctypes  # noqa: PLC0415 - the agent has checked it is there (guest.harden)
    import subprocess  # noqa: PLC0415 - only here (see `spawn`)
    import termios  # noqa: PLC0415

    libc = ctypes.CDLL(None, use_errno=True)
    terminal, user = bool(command.pty), command.user
    # Dropped in the child by hand: Popen's `user` and `group` are Python 3.9's.
    groups = os.getgrouplist(user.pw_name, user.pw_gid) if user is not None else []

    def in_child() -> None:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        if terminal:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        if user is not None:
            os.setgroups(groups)
            os.setresgid(user.pw_gid, user.pw_gid, user.pw_gid)
            os.setresuid(user.pw_uid, user.pw_uid, user.pw_uid)

    stdin = subprocess.DEVNULL if stdio[0] is None else stdio[0]
    try:
        return subprocess.Popen(
            command.runs,
            stdin=stdin,
            stdout=stdio[1],
            stderr=stdio[2],
            cwd=command.cwd,
            env=command.env,
            start_new_session=True,
            pass_fds=keep,
            preexec_fn=in_child,  # noqa: PLW1509 - the fallback where no leader was built
        )
    except OSError as exc:
        raise _failure(EXEC, exc.errno or errno.EIO, command.runs[0]) from None
    except subprocess.SubprocessError:  # `in_child` failed: it could not take the user
        raise _failure(EXEC, errno.EPERM, command.runs[0]) from None


def _terminal(command: Command, child_fds: List[int], ours: Dict[str, int]) -> Stdio:
    master, slave = os.openpty()
    child_fds.append(slave)
    pty = command.pty or {}
    rows, cols = int(pty.get("rows", 24)), int(pty.get("cols", 80))
    set_size(master, rows, cols)
    if command.user is not None:
        os.fchown(slave, command.user.pw_uid, command.user.pw_gid)
    command.env.setdefault("TERM", "xterm-256color")
    ours["pty"] = master
    return slave, slave, slave


def _pipes(command: Command, child_fds: List[int], ours: Dict[str, int]) -> Stdio:
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    child_fds += [out_w, err_w]
    ours.update(stdout=out_r, stderr=err_r)
    stdin: Optional[int] = None
    if command.stdin:
        stdin, in_w = os.pipe()
        child_fds.append(stdin)
        ours["stdin"] = in_w
    return stdin, out_w, err_w


def set_size(fd: int, rows: int, cols: int) -> None:
    """Set the size of the terminal whose master is `fd`."""
    import termios  # noqa: PLC0415 - once a terminal is used, not in every idle agent

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def queued(fd: int) -> int:
    """How many bytes the pipe or terminal `fd` holds, ready to read (0 if it cannot say)."""
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, FIONREAD, b"\0" * 4))[0])
    except OSError:
        return 0
