"""What the guest agent reads of a command's output once the command has exited (`Agent.pump`):
all it wrote before its exit, however late the host's credit comes, and no more than a moment
of what a process it left behind writes on."""

from __future__ import annotations

import os
import threading
import time
import tty
from pathlib import Path

from corral.agent import aio, aiosync, guest
from corral.agent import protocol as P
from tests.unit.test_agent_aio import fresh_loop, run  # noqa: F401 - each test's own `loop`


class Exited:
    """A process that has exited, as the pump sees it."""

    def __init__(self, pty_fd: int | None = None) -> None:
        self.exited = aiosync.Event()
        self.exited.set()
        self.pty_fd = pty_fd


class Host:
    """A stream to the host that takes `stall` seconds to give credit for the first chunk."""

    def __init__(self, stall: float = 0.0) -> None:
        self.cancelled = False
        self.stall = stall
        self.received = bytearray()

    async def send_data(self, kind: int, data: bytes) -> None:
        if self.stall:
            await aio.sleep(self.stall)
            self.stall = 0.0
        self.received += data


def test_what_a_terminal_held_at_the_exit_is_all_sent_however_late_the_credit(
    loop: aio.Loop, tmp_path: Path
) -> None:
    """A terminal holds more than FIONREAD counts (4 KiB on Linux and under gVisor): what it
    held is read on past the limit, until it has no more."""
    master, replica = os.openpty()
    tty.setraw(replica)
    os.set_blocking(replica, False)
    written = 0
    try:
        while True:
            written += os.write(replica, b"x" * 1024)
    except BlockingIOError:  # the terminal is full
        pass
    os.close(replica)
    os.set_blocking(master, False)
    assert written > 8192  # more than FIONREAD says, or this would prove nothing
    host = Host(stall=guest.DRAIN_LIMIT + 0.5)
    agent = guest.Agent(str(tmp_path), b"k" * 32)
    run(loop, agent.pump(host, Exited(pty_fd=master), master, P.STDOUT))  # type: ignore[arg-type]
    assert bytes(host.received) == b"x" * written


def test_a_process_left_writing_does_not_hold_the_command_open(
    loop: aio.Loop, tmp_path: Path
) -> None:
    """The command wrote its own output and exited; a process it left behind writes on every
    20 ms. The pump sends the command's output and stops (pytest's timeout would catch a
    pump that never stops; here it took the limit, about a second)."""
    readable, writable = os.pipe()
    os.write(writable, b"own\n" * 1000)
    stop = threading.Event()

    def left_behind() -> None:
        while not stop.wait(0.02):
            try:
                os.write(writable, b"tick\n")
            except OSError:  # the pump closed its end
                return

    writer = threading.Thread(target=left_behind)
    writer.start()
    try:
        os.set_blocking(readable, False)
        host = Host()
        agent = guest.Agent(str(tmp_path), b"k" * 32)
        start = time.monotonic()
        run(loop, agent.pump(host, Exited(), readable, P.STDOUT))  # type: ignore[arg-type]
        assert time.monotonic() - start < 30  # a bound for a hang, not a speed
        assert bytes(host.received).startswith(b"own\n" * 1000)
    finally:
        stop.set()
        writer.join()
        os.close(writable)


def test_queued_says_what_a_pipe_holds_with_this_hosts_fionread() -> None:
    import termios

    from corral.agent import procs

    assert procs.FIONREAD == termios.FIONREAD
    r, w = os.pipe()
    try:
        assert procs.queued(r) == 0
        os.write(w, b"x" * 1000)
        assert procs.queued(r) == 1000
    finally:
        os.close(r)
        os.close(w)
    directory = os.open("/", os.O_RDONLY)
    try:
        assert procs.queued(directory) == 0  # it cannot say (ENOTTY)
    finally:
        os.close(directory)
