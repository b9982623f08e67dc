"""The `reaper` program (runtimes/reaper.c) and how gVisor's runtime starts runsc under it
(`runtimes.gvisor.run_reaped`): what the command leaves running is the reaper's, and reaped as
it exits, not left to the host's init. Real processes; no runsc."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.core.errors import SandboxFailed
from corral.engine.datadir import install_tools
from corral.runtimes.gvisor import run_reaped
from tests.conftest import proc_status, wait_until


@pytest.fixture(scope="module")
def reaper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tools = tmp_path_factory.mktemp("tools") / "bin"
    assert install_tools(tools), "the engine's programs must build (is gcc installed?)"
    return tools / "reaper"


@pytest.fixture
def log_fd(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT, 0o600)
    yield fd
    os.close(fd)


async def test_what_the_command_leaves_running_is_the_reapers_and_reaped_when_it_exits(
    reaper: Path, log_fd: int, tmp_path: Path
) -> None:
    pid_file = tmp_path / "left"
    script = f"sleep 60 & echo $! > {pid_file}; exit 3"  # as runsc create leaves its Sentry
    assert run_reaped(["/bin/sh", "-c", script], reaper, log_fd, 10) == 3
    left = int(pid_file.read_text())
    parent = int(proc_status(left)["PPid"])
    assert parent != 1 and proc_status(parent)["Name"] == "reaper"  # not handed to the host's init
    assert not proc_status(parent)["State"].startswith(("Z", "X"))  # alive, for what is left
    os.kill(left, signal.SIGKILL)
    # Reaped by the reaper at once, which then has nothing left and ends.
    await wait_until(lambda: proc_status(left) == {}, "the process left running is reaped")
    await wait_until(
        lambda: proc_status(parent).get("State", "Z").startswith(("Z", "X")), "reaper ends"
    )


def test_a_command_that_cannot_run_or_is_killed_reports_so(reaper: Path, log_fd: int) -> None:
    assert run_reaped(["/nonexistent/runsc", "create"], reaper, log_fd, 10) == 127
    assert run_reaped(["/bin/sh", "-c", "kill -9 $$"], reaper, log_fd, 10) == -signal.SIGKILL


async def test_a_command_past_its_time_is_killed(reaper: Path, log_fd: int, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    with pytest.raises(subprocess.TimeoutExpired):
        run_reaped(["/bin/sh", "-c", f"echo $$ > {pid_file}; exec sleep 60"], reaper, log_fd, 0.5)
    gone = int(pid_file.read_text())
    await wait_until(lambda: proc_status(gone) == {}, "the command is killed and reaped")


async def test_the_reaper_keeps_nothing_of_the_engine(
    reaper: Path, log_fd: int, tmp_path: Path
) -> None:
    """Its status pipe is not the command's, and it holds no log, terminal or directory."""
    pid_file = tmp_path / "pid"
    script = f"sleep 60 & echo $! > {pid_file}; ls -l /proc/$$/fd >&2"
    assert run_reaped(["/bin/sh", "-c", script], reaper, log_fd, 10) == 0
    left = int(pid_file.read_text())
    parent = int(proc_status(left)["PPid"])
    try:

        def held() -> set[str]:
            fds = os.listdir(f"/proc/{parent}/fd")
            return {os.readlink(f"/proc/{parent}/fd/{fd}") for fd in fds}

        # The status pipe goes once the command's status is written to it.
        await wait_until(
            lambda: held() == {"/dev/null"}, f"the reaper holds only /dev/null: {held()}"
        )
        assert os.readlink(f"/proc/{parent}/cwd") == "/"
        assert "pipe:" not in (tmp_path / "log").read_text()  # the command had only its stdio
    finally:
        os.kill(left, signal.SIGKILL)


def test_its_status_is_read_past_descriptor_1024(reaper: Path, log_fd: int) -> None:
    """A busy engine holds thousands of descriptors: the status pipe may be numbered past
    select()'s limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 1100:
        pytest.skip(f"this process may not open 1100 files (hard limit {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1100), hard))
    held: list[int] = []
    try:
        while not held or held[-1] < 1030:  # every lower number taken: the pipe's are above
            held.append(os.dup(log_fd))
        assert run_reaped(["/bin/sh", "-c", "exit 5"], reaper, log_fd, 10) == 5
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_without_the_reaper_the_command_still_runs(log_fd: int, tmp_path: Path) -> None:
    missing = tmp_path / "reaper"
    assert run_reaped(["/bin/sh", "-c", "exit 4"], missing, log_fd, 10) == 4
    with pytest.raises(subprocess.TimeoutExpired):
        run_reaped(["/bin/sleep", "60"], missing, log_fd, 0.3)


def test_a_bad_descriptor_is_refused(reaper: Path) -> None:
    for bad in ("x", "-1", "99999999999"):
        done = subprocess.run(
            [str(reaper), bad, "/bin/true", "true"], check=False, capture_output=True
        )
        assert done.returncode == 2 and b"STATUSFD" in done.stderr
    assert subprocess.run([str(reaper), "1"], check=False, capture_output=True).returncode == 2


def test_a_reaper_that_cannot_report_is_an_error(log_fd: int, tmp_path: Path) -> None:
    broken = tmp_path / "reaper"
    broken.write_text("#!/bin/sh\nexit 0\n")  # ends without a word on the status pipe
    broken.chmod(0o755)
    with pytest.raises(SandboxFailed, match="reaper"):
        run_reaped(["/bin/true"], broken, log_fd, 10)
