"""The guest agent's memory guard decides whom to kill from what the sandbox's kernel reports."""

from __future__ import annotations

import os
import signal

import pytest

from corral.agent import aio, memory

MiB = 1 << 20


@pytest.fixture
def kills(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    killed: list[int] = []

    def kill(pid: int, sig: int) -> None:
        assert sig == signal.SIGKILL
        killed.append(pid)

    monkeypatch.setattr(os, "kill", kill)
    return killed


def scene(monkeypatch: pytest.MonkeyPatch, used: int, largest: int, held: int) -> None:
    monkeypatch.setattr(memory, "in_use", lambda: used)
    monkeypatch.setattr(memory, "processes", lambda: ((4242, largest), held))
    monkeypatch.setattr(memory, "_alive", lambda pid: False)


def test_under_the_budget_nothing_dies(monkeypatch: pytest.MonkeyPatch, kills: list[int]) -> None:
    scene(monkeypatch, used=100 * MiB, largest=90 * MiB, held=95 * MiB)
    assert memory.Guard(256 * MiB).check(lambda pid: None) == memory.IDLE_INTERVAL
    scene(monkeypatch, used=200 * MiB, largest=90 * MiB, held=95 * MiB)
    assert memory.Guard(256 * MiB).check(lambda pid: None) == memory.BUSY_INTERVAL
    assert kills == []


def test_over_the_budget_the_largest_process_dies_and_is_blamed(
    monkeypatch: pytest.MonkeyPatch, kills: list[int]
) -> None:
    scene(monkeypatch, used=300 * MiB, largest=250 * MiB, held=260 * MiB)
    blamed: list[int] = []
    guard = memory.Guard(256 * MiB)
    guard.check(blamed.append)
    assert blamed == kills == [4242]
    # One kill at a time: while its memory shows as in use, nobody else dies.
    monkeypatch.setattr(memory, "_alive", lambda pid: True)
    guard.check(blamed.append)
    assert kills == [4242]


def test_files_in_memory_past_the_budget_kill_nobody(
    monkeypatch: pytest.MonkeyPatch, kills: list[int]
) -> None:
    """Processes hold 10 MiB of a 100 MiB overage: no kill brings the sandbox back, so none
    is made, and the host's limit ends the sandbox (reported as out_of_memory)."""
    scene(monkeypatch, used=356 * MiB, largest=8 * MiB, held=10 * MiB)
    blamed: list[int] = []
    memory.Guard(256 * MiB).check(blamed.append)
    assert blamed == kills == []


@pytest.mark.parametrize("running", [False, True])
async def test_it_looks_more_often_while_something_runs(
    monkeypatch: pytest.MonkeyPatch, running: bool
) -> None:
    """A process can fill hundreds of MiB between two idle looks (a gVisor sandbox's headroom
    is 64 MiB): while one runs, the guard looks 20 times a second."""
    monkeypatch.setattr(memory, "in_use", lambda: MiB)
    delays: list[float] = []

    async def sleep(delay: float) -> None:
        delays.append(delay)
        raise aio.CancelledError

    monkeypatch.setattr(memory.aio, "sleep", sleep)
    with pytest.raises(aio.CancelledError):
        await memory.Guard(256 * MiB).watch(lambda pid: None, lambda: running)
    assert delays == [memory.RUNNING_INTERVAL if running else memory.IDLE_INTERVAL]
