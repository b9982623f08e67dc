"""How the agent starts a command (agent.procs.spawn), on the host, each way: through the
leader library the engine builds (the leader's steps in a vfork child of the agent), through
the `leader` program (vfork, then its exec), and without either (Python forks and sets things up
in the child). All must give the command the same process."""

from __future__ import annotations

import contextlib
import os
import pwd
import py_compile
import select
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.agent import procs
from corral.agent.fileops import GuestError
from corral.engine import datadir
from corral.engine.datadir import build_leader, install_agent


@pytest.fixture(scope="module")
def leader_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    agent_dir = tmp_path_factory.mktemp("agent")
    assert build_leader(agent_dir), "the leader program must build (is gcc installed?)"
    assert (agent_dir / "leader.lib").exists(), "the leader library must build on x86-64"
    return agent_dir


@pytest.fixture(params=["library", "leader", "fork"])
def way(request: pytest.FixtureRequest, leader_dir: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test runs each way; the other ways are made to fail, so none is taken silently."""
    leading = request.param != "fork"
    monkeypatch.setattr(procs, "LEADER", str(leader_dir / ("leader" if leading else "absent")))
    library = "leader.lib" if request.param == "library" else "absent.lib"
    monkeypatch.setattr(procs, "LIBRARY", str(leader_dir / library))
    monkeypatch.setattr(procs, "STARTERS", {})

    def not_this_way(*_args: object, **_kwargs: object) -> None:
        raise AssertionError(f"spawn did not go the {request.param} way")

    monkeypatch.setattr(procs, "_fork" if leading else "_lead", not_this_way)
    if request.param == "library":
        monkeypatch.setattr(os, "posix_spawn", not_this_way)
    return str(request.param)


BASE_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/root"}
POSIX_SPAWN = os.posix_spawn


@contextlib.contextmanager
def start(params: dict[str, object]) -> Iterator[tuple[procs.Child, dict[str, int]]]:
    command = procs.Command(params, BASE_ENV)
    popen, fds = procs.spawn(command)
    try:
        yield popen, fds
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(popen.pid, signal.SIGKILL)
        finish(popen)
        for fd in fds.values():
            os.close(fd)


def finish(child: procs.Child | subprocess.Popen[bytes], timeout: float = 30) -> int:
    """The exit code (or -signal) of a process `procs.spawn` started, reaped within `timeout`."""
    if isinstance(child, subprocess.Popen):  # the fork way
        return child.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while child.returncode is None:
        pid, status = os.waitpid(child.pid, os.WNOHANG)
        if pid:
            child.returncode = status
        assert time.monotonic() < deadline, f"process {child.pid} still running"
        time.sleep(0.005)
    return os.waitstatus_to_exitcode(child.returncode)


def run(params: dict[str, object]) -> tuple[int, bytes, bytes]:
    return run_command(procs.Command(params, BASE_ENV))


def read_all(fd: int) -> bytes:
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    return data


def test_argv_env_cwd_and_session(way: str, tmp_path: Path) -> None:
    status, out, err = run(
        {
            "argv": ["sh", "-c", 'echo "$GREETING"; pwd; ps -o sid= -p $$; echo $$'],
            "env": {"GREETING": "hi"},
            "cwd": str(tmp_path),
        }
    )
    assert status == 0, err
    greeting, cwd, sid, pid = out.decode().split()
    assert (greeting, cwd) == ("hi", str(tmp_path))
    assert sid == pid  # the leader of a session of its own


def test_what_the_command_detaches_stays_in_its_tree(way: str) -> None:
    """The command is a child subreaper: a `setsid -f` child is re-parented to it."""
    orphan = "import os, time; time.sleep(0.3); print(os.getppid(), flush=True)"
    status, out, err = run(
        {"argv": ["sh", "-c", f'setsid -f python3 -c "{orphan}"; sleep 1; echo $$']}
    )
    assert status == 0, err
    ppid, pid = out.split()
    assert ppid == pid


@pytest.mark.skipif(os.geteuid() != 0, reason="changing user needs root")
def test_user_and_groups(way: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another user's command starts through the program, never the library (see
    procs._posix_spawn for why)."""
    if way == "library":
        monkeypatch.setattr(os, "posix_spawn", POSIX_SPAWN)

        def not_the_library(*_args: object) -> None:
            raise AssertionError("another user's command started through the library")

        monkeypatch.setattr(procs, "_clone", not_the_library)
    user = pwd.getpwnam("nobody")
    status, out, err = run(
        {"argv": ["sh", "-c", "id -u; id -g; id -G; echo $HOME"], "user": user.pw_name}
    )
    assert status == 0, err
    uid, gid, groups, home = out.decode().split("\n")[:4]
    assert (int(uid), int(gid), home) == (user.pw_uid, user.pw_gid, user.pw_dir)
    expected = os.getgrouplist(user.pw_name, user.pw_gid)
    assert sorted(map(int, groups.split())) == sorted(set(expected))


def test_terminal_is_the_controlling_one(way: str) -> None:
    params = {"argv": ["sh", "-c", "tty; ps -o tty= -p $$"], "pty": {"rows": 5, "cols": 40}}
    with start(params) as (popen, fds):
        output = b""
        while True:
            ready, _, _ = select.select([fds["pty"]], [], [], 10)
            assert ready, output
            try:
                chunk = os.read(fds["pty"], 4096)
            except OSError:  # EIO: the command is done
                break
            if not chunk:
                break
            output += chunk
        assert finish(popen, 10) == 0
        device, controlling = output.decode().split()
        assert device.startswith("/dev/pts/")
        assert controlling == device.removeprefix("/dev/")


def test_what_cannot_start_is_a_clear_error(way: str, tmp_path: Path) -> None:
    with pytest.raises(GuestError) as missing:
        run({"argv": ["no-such-command-xyz"]})
    assert missing.value.code == "command_not_found"
    with pytest.raises(GuestError) as missing_path:
        run({"argv": [str(tmp_path / "nothing-here")]})
    assert missing_path.value.code == "command_not_found"
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\necho no\n")
    script.chmod(0o644)
    with pytest.raises(GuestError) as denied:
        run({"argv": [str(script)]})
    assert denied.value.code == "EACCES"
    script.chmod(0o755)
    assert run({"argv": ["./not-executable"], "cwd": str(tmp_path)})[1] == b"no\n"


def test_nothing_of_the_agent_leaks_into_the_command(way: str) -> None:
    quiet_r, quiet_w = os.pipe()  # not inheritable, like every descriptor the agent opens
    loud_r, loud_w = os.pipe()
    os.set_inheritable(loud_w, True)  # and one that is: closed for the command all the same
    try:
        status, out, err = run({"argv": ["sh", "-c", "ls /proc/self/fd"]})
    finally:
        for fd in (quiet_r, quiet_w, loud_r, loud_w):
            os.close(fd)
    assert status == 0, err
    assert sorted(int(fd) for fd in out.split()) == [0, 1, 2, 3]  # 3: ls's own directory


def test_the_command_has_default_signals_and_the_agents_mask(way: str) -> None:
    """Python ignores SIGPIPE and SIGXFSZ, and the agent handles signals of its own: the command
    starts with them at their defaults, and with the signal mask the agent had."""
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
    try:
        status, out, err = run({"argv": ["grep", "-E", "^Sig(Blk|Ign|Cgt)", "/proc/self/status"]})
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        signal.signal(signal.SIGUSR1, previous)
    assert status == 0, err
    masks = {line.split(":")[0]: int(line.split()[1], 16) for line in out.decode().splitlines()}
    for name in ("SIGPIPE", "SIGXFSZ", "SIGUSR1"):
        bit = 1 << (getattr(signal, name) - 1)
        assert not masks["SigIgn"] & bit and not masks["SigCgt"] & bit, name
    assert masks["SigBlk"] == 1 << (signal.SIGUSR2 - 1)


@pytest.mark.parametrize("bad", [{"A\0B": "1"}, {"A": "1\0"}, {"A=B": "1"}])
def test_what_a_c_string_cannot_carry_is_refused_as_posix_spawn_refuses_it(
    way: str, bad: dict[str, str]
) -> None:
    command = procs.Command({"argv": ["true"]}, BASE_ENV)
    command.env.update(bad)
    with pytest.raises(ValueError, match=r"null byte|environment variable name"):
        procs.spawn(command)


def test_a_process_the_library_cannot_make_is_a_clear_error(
    leader_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """clone's refusal (EAGAIN at the sandbox's process limit) is said as posix_spawn's was."""
    monkeypatch.setattr(procs, "LEADER", str(leader_dir / "leader"))
    monkeypatch.setattr(procs, "STARTERS", {procs.LIBRARY: lambda *_args: -11})
    with pytest.raises(GuestError) as refused:
        run({"argv": ["true"]})
    assert refused.value.code == "limit_reached"


def test_descriptors_passed_on_purpose_stay_open_under_their_numbers(way: str) -> None:
    """As a code context's kernel gets its request and result pipes."""
    first_r, first_w = os.pipe()
    second_r, second_w = os.pipe()
    command = procs.Command({"argv": ["sh", "-c", "ls /proc/self/fd"]}, BASE_ENV)
    popen, fds = procs.spawn(command, pass_fds=(first_r, second_w))
    try:
        assert finish(popen) == 0
        listed = sorted(int(fd) for fd in read_all(fds["stdout"]).split())
    finally:
        for fd in (*fds.values(), first_r, first_w, second_r, second_w):
            os.close(fd)
    passed = {0, 1, 2, first_r, second_w}
    own = min(set(range(3, 64)) - passed)  # ls's own directory: the lowest free number
    assert listed == sorted(passed | {own})


def test_the_leader_is_built_once_and_rebuilt_for_new_source_or_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "leader.c").write_text("/* how earlier versions said what they built from */")
    assert build_leader(tmp_path)
    assert not (tmp_path / "leader.c").exists()
    leader = tmp_path / "leader"
    assert stat.S_IMODE(leader.stat().st_mode) == 0o755
    built = leader.stat().st_mtime_ns
    assert build_leader(tmp_path)
    assert leader.stat().st_mtime_ns == built  # unchanged source and flags: kept
    (tmp_path / "leader.built").write_text("another version's source")
    assert build_leader(tmp_path)
    assert leader.stat().st_mtime_ns != built
    built = leader.stat().st_mtime_ns
    monkeypatch.setattr(datadir, "LEADER_FLAGS", (*datadir.LEADER_FLAGS, "-DCORRAL_NEWER"))
    assert build_leader(tmp_path)
    assert leader.stat().st_mtime_ns != built  # the same source with other flags: rebuilt
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers


def test_a_library_is_never_replaced_and_the_pointer_names_the_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gVisor sandbox restored from a snapshot maps its agent's library again by name, so a
    new version (here: new flags) is a new file beside the old one, which stays unchanged."""
    assert build_leader(tmp_path)
    old = tmp_path / (tmp_path / "leader.lib").read_text()
    assert old.name.startswith("leader-") and old.name.endswith(".so")
    built = old.stat().st_mtime_ns
    assert build_leader(tmp_path)
    assert old.stat().st_mtime_ns == built  # the same source and flags: kept
    flags = (*datadir.LIBRARY_FLAGS, "-DCORRAL_ANOTHER_VERSION")
    monkeypatch.setattr(datadir, "LIBRARY_FLAGS", flags)
    assert build_leader(tmp_path)
    new = tmp_path / (tmp_path / "leader.lib").read_text()
    assert new != old and new.exists()
    assert old.stat().st_mtime_ns == built
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers


def test_without_a_compiler_there_is_no_leader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert build_leader(tmp_path)
    (tmp_path / "leader.built").write_text("an older version's source")
    monkeypatch.setattr(datadir, "LIBRARY_FLAGS", (*datadir.LIBRARY_FLAGS, "-DCORRAL_NEWER"))
    monkeypatch.setenv("CC", "no-such-compiler")
    assert not build_leader(tmp_path)
    assert not (tmp_path / "leader").exists()  # a stale build is not used with a new agent
    assert not (tmp_path / "leader.lib").exists()  # nor an older library


@pytest.mark.parametrize(
    "cmd",
    [
        "echo ok",
        "echo  two   spaces\tand-a-tab",
        "true",
        "env",
        "ls -d /tmp",
        "python3 -c pass",
        "printenv PWD SHLVL _",
        "/usr/bin/env",
    ],
)
def test_a_plain_command_runs_without_the_shell_as_the_shell_would(cmd: str) -> None:
    base = {"PATH": "/usr/bin:/bin", "HOME": "/root", "LANG": "C"}
    direct = procs.Command({"cmd": cmd}, base)
    assert direct.direct is not None, "a plain command is run without the shell"
    shelled = procs.Command({"cmd": cmd}, base)
    shelled.direct = None
    assert run_command(direct) == run_command(shelled)


@pytest.mark.parametrize(
    "cmd",
    [
        "echo $HOME",  # expansion
        "echo a; echo b",
        "echo a\necho b",
        "ls *",
        "echo -n x",  # the builtin's options are its own
        "echo 'quoted'",
        "cd /tmp",
        "A=1 env",
        "pwd",  # the builtin prints the logical directory
        "no-such-program-xyz",  # the shell says so, with 127
        "exit 3",
        "echo a > /tmp/x",
        "echo ~",
        "echo a\\ b",
    ],
)
def test_anything_else_runs_in_the_shell(cmd: str) -> None:
    assert procs.Command({"cmd": cmd}, {"PATH": "/usr/bin:/bin"}).direct is None


def test_the_shell_is_kept_where_the_environment_asks_for_it() -> None:
    for env in ({"BASH_ENV": "/etc/profile"}, {"BASH_FUNC_ls%%": "() { echo no; }"}):
        command = procs.Command({"cmd": "ls"}, {"PATH": "/usr/bin:/bin", **env})
        assert command.direct is None


def test_a_file_without_an_interpreter_line_runs_in_the_shell(tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_text("echo from a script\n")
    script.chmod(0o755)
    command = procs.Command({"cmd": "./script", "cwd": str(tmp_path)}, {"PATH": "/bin"})
    assert command.direct is None
    assert run_command(command)[1] == b"from a script\n"


def run_command(command: procs.Command) -> tuple[int, bytes, bytes]:
    popen, fds = procs.spawn(command)
    try:
        status = finish(popen)
        out, err = read_all(fds["stdout"]), read_all(fds["stderr"])
    finally:
        for fd in fds.values():
            os.close(fd)
    if b"=" in out:  # an environment, in no particular order
        out = b"\n".join(sorted(out.splitlines()))
    return status, out, err


def test_the_agent_is_installed_compiled_for_this_python(tmp_path: Path) -> None:
    """Its directory is read-only in a sandbox: without these, every start compiles them."""
    install_agent(tmp_path)
    loaded = imported_from(tmp_path)
    for name in ("procs", "contexts", "shell", "fileops"):
        assert f"code object from '{tmp_path}/__pycache__/{name}." in loaded, loaded
    shell = tmp_path / "shell.py"
    shell.write_text("# another version\n")  # and compiled: what an older Corral left
    py_compile.compile(str(shell), invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
    install_agent(tmp_path)
    assert f"code object from '{tmp_path}/__pycache__/shell." in imported_from(tmp_path)


def imported_from(agent_dir: Path) -> str:
    """What Python says (-v) while it imports the agent's modules from `agent_dir`."""
    probe = "import sys; sys.path.insert(0, sys.argv[1]); import procs, contexts"
    argv = [sys.executable, "-I", "-S", "-B", "-v", "-c", probe, str(agent_dir)]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stderr


def test_a_fifo_named_as_a_command_never_blocks_the_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_exec(*_args: object) -> None:
        raise AssertionError("an exec was tried")

    monkeypatch.setattr(procs, "_lead", no_exec)
    monkeypatch.setattr(procs, "_fork", no_exec)
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "fifo").chmod(0o755)
    command = procs.Command({"cmd": "./fifo", "cwd": str(tmp_path)}, {"PATH": "/bin"})
    assert command.direct is None  # left to the shell, which reports it
    # Named by a path, it is refused before any exec (gVisor's exec would block opening it,
    # and the agent with it); so is a directory.
    for name in ("./fifo", str(tmp_path / "fifo"), str(tmp_path)):
        with pytest.raises(GuestError) as refused:
            procs.spawn(procs.Command({"argv": [name], "cwd": str(tmp_path)}, BASE_ENV))
        assert refused.value.code == "EACCES", name


# What makes the leader's close_range fail (EPERM), as an old seccomp profile would.
REFUSED = ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "inject=close_range:error=EPERM"]


@pytest.mark.parametrize("close_range", ["works", "refused"])
def test_the_leader_keeps_only_what_it_is_told_to_and_reads_the_old_form(
    leader_dir: Path, close_range: str
) -> None:
    """`ERRFD:KEEP` closes every other descriptor from 3 up at the exec; plain `ERRFD` (agents
    before it, still running in older sandboxes after an upgrade) closes nothing more. Where
    close_range is refused (Linux before 5.11, a seccomp filter that does not know it: here
    strace makes it fail) the leader goes by /proc/self/fd."""
    err_r, err_w = os.pipe()
    kept_r, kept_w = os.pipe()
    other = os.open(os.devnull, os.O_RDONLY)
    fds = (err_w, kept_r, kept_w, other)

    def listed(errfd: str) -> tuple[int, set[int]]:
        argv = [str(leader_dir / "leader"), errfd, "0", "-1", "-1", "-", "/bin/ls"]
        if close_range == "refused":
            argv = [*REFUSED, *argv]
        done = subprocess.run(
            [*argv, "ls", "/proc/self/fd"], pass_fds=fds, capture_output=True, check=False
        )
        return done.returncode, {int(fd) for fd in done.stdout.split()}

    try:
        assert listed(f"{err_w}:{kept_r},{kept_w}") == (0, {0, 1, 2, 3, kept_r, kept_w})
        assert listed(f"{err_w}:") == (0, {0, 1, 2, 3})
        status, old_form = listed(str(err_w))
        assert status == 0 and {kept_r, kept_w, other} <= old_form and err_w not in old_form
        for bad in (f"{err_w}:{kept_w},{kept_r}", f"{err_w}:2", f"{err_w}:x", f"{err_w};"):
            assert listed(bad)[0] == 127, bad  # refused, nothing run
    finally:
        for fd in (err_r, *fds):
            os.close(fd)


def test_a_c_library_without_posix_spawns_setsid_forks_instead(
    leader_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python's posix_spawn refuses `setsid` where the C library lacks it (glibc before 2.26):
    the command starts the slow way, in a session of its own all the same."""

    def without_setsid(*_args: object, **_kwargs: object) -> int:
        raise NotImplementedError("setsid")

    monkeypatch.setattr(procs, "LEADER", str(leader_dir / "leader"))
    monkeypatch.setattr(procs, "LIBRARY", str(leader_dir / "absent.lib"))
    monkeypatch.setattr(procs, "SPAWNS", [True])
    monkeypatch.setattr(os, "posix_spawn", without_setsid)
    for _ in range(2):  # and once it has said so, it is not asked again
        status, out, _ = run({"argv": ["sh", "-c", "ps -o sid= -p $$; echo $$"]})
        sid, pid = out.split()
        assert status == 0 and sid == pid
        assert procs.SPAWNS == []
