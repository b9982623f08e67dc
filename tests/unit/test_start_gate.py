"""The gate sandboxes' starts wait at: a bound on how many run at once, urgent ones first."""

from __future__ import annotations

import asyncio

import pytest

from corral.engine.gate import StartGate, default_limit


async def _hold(
    gate: StartGate, urgent: bool, order: list[str], name: str, go: asyncio.Event
) -> None:
    async with gate.turn(urgent=urgent):
        order.append(name)
        await go.wait()


async def test_no_more_than_the_limit_start_at_once_and_all_do() -> None:
    gate, order, go = StartGate(2), list[str](), asyncio.Event()
    held = [asyncio.create_task(_hold(gate, True, order, str(n), go)) for n in range(5)]
    await asyncio.sleep(0.05)
    assert (gate.running, len(order)) == (2, 2)
    go.set()
    await asyncio.wait_for(asyncio.gather(*held), 10)
    assert sorted(order) == ["0", "1", "2", "3", "4"] and gate.running == 0


async def test_urgent_starts_go_before_a_pools_fill_that_waited_longer() -> None:
    gate, order = StartGate(1), list[str]()
    first, later = asyncio.Event(), asyncio.Event()
    holder = asyncio.create_task(_hold(gate, True, order, "holder", first))
    await asyncio.sleep(0.01)
    fill = asyncio.create_task(_hold(gate, False, order, "fill", later))
    await asyncio.sleep(0.01)
    create = asyncio.create_task(_hold(gate, True, order, "create", later))
    await asyncio.sleep(0.01)
    first.set()
    await asyncio.wait_for(holder, 10)
    await asyncio.sleep(0.05)
    assert order == ["holder", "create"]  # the fill still waits: one place, the create's
    later.set()
    await asyncio.wait_for(asyncio.gather(fill, create), 10)
    assert order == ["holder", "create", "fill"]


async def test_a_freed_place_goes_to_the_next_in_line_not_a_newcomer() -> None:
    gate, order, go = StartGate(1), list[str](), asyncio.Event()
    async with gate.turn(urgent=True):
        first = asyncio.create_task(_hold(gate, True, order, "first", go))
        await asyncio.sleep(0.01)
        assert gate.urgent_waiting == 1
    newcomer = asyncio.create_task(_hold(gate, True, order, "newcomer", go))
    await asyncio.sleep(0.01)
    assert order == ["first"] and gate.running == 1  # handed on as the block ended
    go.set()
    await asyncio.wait_for(asyncio.gather(first, newcomer), 10)
    assert order == ["first", "newcomer"] and gate.running == 0


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="1 or more"):
        StartGate(0)


async def test_a_fill_goes_once_the_urgent_start_it_waited_behind_is_cancelled() -> None:
    gate, order, go = StartGate(1), list[str](), asyncio.Event()
    holder = asyncio.create_task(_hold(gate, False, order, "holder", go))
    await asyncio.sleep(0.01)
    create = asyncio.create_task(_hold(gate, True, order, "create", go))
    fill = asyncio.create_task(_hold(gate, False, order, "fill", go))
    await asyncio.sleep(0.01)
    create.cancel()  # its client went away
    go.set()
    await asyncio.wait_for(asyncio.gather(holder, fill), 10)
    assert order == ["holder", "fill"] and gate.running == 0


async def test_no_limit_lets_every_start_go_and_the_default_grows_with_cpus() -> None:
    gate, order, go = StartGate(None), list[str](), asyncio.Event()
    held = [asyncio.create_task(_hold(gate, n % 2 == 0, order, str(n), go)) for n in range(50)]
    await asyncio.sleep(0.05)
    assert gate.running == 50
    go.set()
    await asyncio.wait_for(asyncio.gather(*held), 10)
    assert default_limit() >= 2


def test_the_default_follows_a_containers_cpu_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """2 per CPU of the affinity, or of a cgroup quota below it; never below 2."""
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(8)))
    monkeypatch.setattr("corral.host.cgroups.cpu_limit", lambda: None)
    assert default_limit() == 16
    monkeypatch.setattr("corral.host.cgroups.cpu_limit", lambda: 1.5)
    assert default_limit() == 3
    monkeypatch.setattr("corral.host.cgroups.cpu_limit", lambda: 0.25)
    assert default_limit() == 2
    monkeypatch.setattr("corral.host.cgroups.cpu_limit", lambda: 64.0)
    assert default_limit() == 16
