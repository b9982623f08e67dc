"""Warm pools on a real engine: fresh per claim, refilled, bypassable, matched exactly."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from corral.core.errors import InvalidRequest, SandboxEnded, SandboxNotFound
from corral.core.spec import SandboxSpec
from corral.core.state import SandboxState
from corral.engine import Engine
from corral.engine.gate import default_limit
from corral.engine.record import Phase
from corral.host.cgroups import Cgroup
from tests.conftest import leftovers


async def pool_of(engine: Engine, name: str, idle: int | None = None) -> dict[str, Any]:
    """The pool's figures, once it has `idle` idle sandboxes (the bound only catches hangs; a
    fresh data directory builds the debian image first, ~30 s here)."""
    for _ in range(3600):
        pool = next(p for p in engine.list_pools() if p["name"] == name)
        if idle is None or pool["idle"] == idle:
            return pool
        await asyncio.sleep(0.05)
    raise AssertionError(f"pool {name} never had {idle} idle sandboxes: {pool}")


async def test_claimed_sandboxes_are_fresh_and_look_new(engine: Engine, runtime: str) -> None:
    engine.configure_pool("p", SandboxSpec(runtime=runtime), 2)
    await pool_of(engine, "p", idle=2)
    assert engine.list_sandboxes() == []  # idle pooled sandboxes are invisible
    # Idle, a gVisor one is frozen (its Sentry would burn CPU); a namespaces one just sleeps.
    idle = [r.id for r in engine.registry if r.phase is Phase.POOLED]
    freezes = runtime == "gvisor"
    assert [Cgroup(f"corral/{i}").frozen() for i in idle] == [freezes, freezes]

    before = time.time()
    spec = SandboxSpec(
        runtime=runtime, env={"WHO": "first"}, metadata={"job": "1"}, timeout=120, workdir="/tmp"
    )
    first = await engine.create(spec)
    second = await engine.create(SandboxSpec(runtime=runtime, env={"WHO": "second"}))
    pool = await pool_of(engine, "p")
    assert pool["hits"] == 2 and pool["misses"] == 0
    try:
        assert not any(Cgroup(f"corral/{s.id}").frozen() for s in (first, second))
        assert first.created_at >= before
        assert [h.state for h in first.history] == [SandboxState.CREATING, SandboxState.RUNNING]
        assert first.expires_at is not None and 115 < first.expires_at - time.time() <= 120
        assert first.metadata == {"job": "1"} and first.spec.timeout == 120
        assert [s.id for s in engine.list_sandboxes()] == [first.id, second.id]
        result = await engine.run(first.id, "echo $WHO; pwd")
        assert result.stdout == b"first\n/tmp\n"
        assert (await engine.run(second.id, "echo $WHO")).stdout == b"second\n"
        # Never used before: what one claimed sandbox does is not in another.
        await engine.files(first.id).write("/root/mine", "x")
        assert not await engine.files(second.id).exists("/root/mine")
        # The pool refills behind the claims.
        await pool_of(engine, "p", idle=2)
    finally:
        await engine.terminate(first.id)
        await engine.terminate(second.id)


async def test_bypass_mismatch_and_miss(engine: Engine) -> None:
    engine.configure_pool("p", SandboxSpec(runtime="namespaces"), 1)
    await pool_of(engine, "p", idle=1)
    bypass = await engine.create(SandboxSpec(runtime="namespaces"), pool=False)
    bigger = await engine.create(SandboxSpec(runtime="namespaces", memory_mb=1024))
    pool = await pool_of(engine, "p", idle=1)
    assert (pool["hits"], pool["misses"]) == (0, 0)  # neither touched the pool
    for info in (bypass, bigger):
        await engine.terminate(info.id)

    engine.configure_pool("p", SandboxSpec(runtime="namespaces"), 0)  # empty: a miss
    await pool_of(engine, "p", idle=0)
    cold = await engine.create(SandboxSpec(runtime="namespaces"))
    assert (await engine.run(cold.id, "true")).ok
    assert (await pool_of(engine, "p"))["misses"] == 1
    await engine.terminate(cold.id)


async def test_pooled_sandboxes_are_unreachable_and_cleaned_up(data_dir: Path) -> None:
    baseline = leftovers(data_dir)
    async with Engine(data_dir) as engine:
        engine.configure_pool("p", SandboxSpec(runtime="namespaces"), 2)
        await pool_of(engine, "p", idle=2)
        idle_ids = list(engine.pools.list()[0].idle)
        for sandbox_id in idle_ids:
            with pytest.raises(SandboxNotFound):
                engine.get(sandbox_id)
            with pytest.raises(SandboxNotFound):
                await engine.run(sandbox_id, "true")
        engine.remove_pool("p")
        for _ in range(200):
            if leftovers(data_dir) == baseline:
                break
            await asyncio.sleep(0.05)
        assert leftovers(data_dir) == baseline
        engine.configure_pool("q", SandboxSpec(runtime="namespaces"), 1)
        await pool_of(engine, "q", idle=1)
    assert leftovers(data_dir) == baseline  # closing the engine ends idle sandboxes too


async def test_a_burst_of_creates_starts_in_turns(data_dir: Path) -> None:
    """One start at a time (`--start-limit 1`): a burst of creates all run, never two
    runtimes starting together, each waiting for the ones before it."""
    async with Engine(data_dir, start_limit=1) as engine:
        gate, inside, most = engine.starts, 0, 0
        taking = gate.turn

        @contextlib.asynccontextmanager
        async def counted(*, urgent: bool) -> AsyncIterator[None]:
            nonlocal inside, most
            async with taking(urgent=urgent):
                inside += 1
                most = max(most, inside)
                try:
                    yield
                finally:
                    inside -= 1

        gate.turn = counted  # type: ignore[method-assign]
        made = await asyncio.gather(
            *(engine.create(SandboxSpec(runtime="namespaces")) for _ in range(4))
        )
        assert most == 1
        for info in made:
            assert (await engine.run(info.id, "echo ok")).stdout == b"ok\n"
        waits = sorted(engine.registry.get(info.id).timings["start_queue"] for info in made)
        assert waits[-1] > waits[0]
    assert Engine(data_dir).starts.limit == default_limit()
    assert Engine(data_dir, start_limit=0).starts.limit is None


async def test_a_create_ended_while_it_waits_its_turn_starts_nothing(data_dir: Path) -> None:
    """A create still waiting for its turn when it is ended (the engine closing) starts no
    runtime when its turn comes, and leaves nothing behind."""
    baseline = leftovers(data_dir)
    async with Engine(data_dir, start_limit=1) as engine:
        async with engine.starts.turn(urgent=True):  # the only place, held
            creating = asyncio.ensure_future(engine.create(SandboxSpec(runtime="namespaces")))
            for _ in range(3600):  # a bound for hangs only (a fresh debian build first)
                if engine.starts.urgent_waiting:
                    break
                await asyncio.sleep(0.05)
            (record,) = [r for r in engine.registry if r.phase is Phase.CREATING]
            await engine.terminate(record.id)
        with pytest.raises(SandboxEnded, match="ended before it started"):
            await creating
        assert engine.registry.get(record.id).info().state is SandboxState.TERMINATED
        assert leftovers(data_dir) == baseline


async def test_bad_pool_settings(engine: Engine) -> None:
    with pytest.raises(InvalidRequest):
        engine.configure_pool("Bad Name", SandboxSpec(), 1)
    with pytest.raises(InvalidRequest):
        engine.configure_pool("p", SandboxSpec(), -1)
    with pytest.raises(InvalidRequest):
        SandboxSpec(memory_mb=1)
