"""Dozing (`corral.engine.doze`): a gVisor sandbox with nothing of its own running is frozen
once unused for a while, and its next use of any kind thaws it and gets its answer.

Real gVisor sandboxes on an engine that dozes after `AFTER` seconds. The only bounds on time
are there to catch hangs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from corral.agent import protocol as P
from corral.core.errors import SandboxFailed
from corral.core.spec import SandboxSpec
from corral.core.state import SandboxState
from corral.engine import Engine, doze
from corral.server.metrics import exposition
from tests.conftest import require_runtime, wait_until

AFTER = 1.0  # seconds unused before a sandbox dozes, here
HANG = 60.0  # seconds: only to catch hangs


@pytest.fixture
async def engine(data_dir: Path) -> AsyncIterator[Engine]:
    require_runtime("gvisor")
    async with Engine(data_dir, doze_after=AFTER) as started:
        yield started


def dozing(engine: Engine, sandbox_id: str) -> bool:
    record = engine.registry.get(sandbox_id)
    return engine.runtimes.get(record.runtime).dozing(record.plan)


async def dozed(engine: Engine, sandbox_id: str) -> None:
    await wait_until(lambda: dozing(engine, sandbox_id), f"{sandbox_id} dozes")


def cpu_seconds(engine: Engine, sandbox_id: str) -> float:
    from corral.runtimes.base import cgroup_for

    return cgroup_for(engine.registry.get(sandbox_id).plan).usage()[0]


async def test_an_idle_sandbox_dozes_and_every_kind_of_use_wakes_it(engine: Engine) -> None:
    info = await engine.create(SandboxSpec(runtime="gvisor"))
    try:
        await engine.files(info.id).write("/root/note", "kept")
        await engine.run(info.id, "echo ok > /tmp/before")
        await dozed(engine, info.id)
        # Frozen: its Sentry burns nothing while it dozes (awake and idle, ~2 % of a core).
        used = cpu_seconds(engine, info.id)
        await asyncio.sleep(1.0)
        assert cpu_seconds(engine, info.id) - used < 0.002
        assert engine.get(info.id).state is SandboxState.RUNNING  # dozing is not a state
        assert b'corral_sandboxes_dozing{runtime="gvisor"} 1.0' in exposition(engine, {})
        # A command, a file read, a listing and the process list each thaw it and answer.
        result = await engine.run(info.id, "cat /root/note /tmp/before")
        assert result.stdout == b"keptok\n" and not dozing(engine, info.id)
        await dozed(engine, info.id)
        assert await engine.files(info.id).read_bytes("/root/note") == b"kept"
        await dozed(engine, info.id)
        assert "note" in [f.name for f in await engine.files(info.id).list("/root")]
        await dozed(engine, info.id)
        assert [p.tag for p in await engine.processes(info.id) if p.running] == []
        # Many uses at once after a doze: one thaws it, all are answered.
        await dozed(engine, info.id)
        results = await asyncio.gather(*(engine.run(info.id, f"echo {i}") for i in range(8)))
        assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(8)]
    finally:
        await engine.terminate(info.id)


async def test_a_sandbox_with_something_of_its_own_running_never_dozes(engine: Engine) -> None:
    info = await engine.create(SandboxSpec(runtime="gvisor"))
    try:
        await engine.run(info.id, "nohup sleep 1000 >/dev/null 2>&1 &")
        await asyncio.sleep(AFTER * 4)  # several of the engine's rounds
        assert not dozing(engine, info.id)
        # Once it is gone, nothing runs but the agent: it dozes.
        await engine.run(info.id, "pkill sleep; true")
        await dozed(engine, info.id)
    finally:
        await engine.terminate(info.id)


async def test_a_background_job_that_ends_by_itself_lets_its_sandbox_doze(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No use after it: the agent is asked again later (`BUSY_RECHECK`), not only after a use."""
    monkeypatch.setattr(doze, "BUSY_RECHECK", 1.0)
    info = await engine.create(SandboxSpec(runtime="gvisor"))
    try:
        await engine.run(info.id, "nohup sleep 4 >/dev/null 2>&1 &")
        await asyncio.sleep(AFTER * 3)
        assert not dozing(engine, info.id)  # the job still runs
        await dozed(engine, info.id)
    finally:
        await engine.terminate(info.id)


async def test_an_open_stream_keeps_a_sandbox_awake(engine: Engine) -> None:
    """A read that waits for its reader (a slow download) must not be frozen mid-way."""
    info = await engine.create(SandboxSpec(runtime="gvisor"))
    try:
        await engine.run(info.id, "head -c 4000000 /dev/urandom > /tmp/big")
        record = engine.registry.get(info.id)
        channel = await record.link.open(P.FS_READ, {"path": "/tmp/big"})
        await asyncio.sleep(AFTER * 4)
        assert not dozing(engine, info.id)
        # Cancelled, it ends although nobody reads what it sent (it waited for credit).
        await channel.cancel()
        await wait_until(lambda: channel.finished, "the cancelled read answers")
        await dozed(engine, info.id)
    finally:
        await engine.terminate(info.id)


async def test_pause_snapshot_and_terminate_of_a_dozing_sandbox(engine: Engine) -> None:
    info = await engine.create(SandboxSpec(runtime="gvisor"))
    try:
        await engine.run(info.id, "echo 1 > /tmp/n")
        await dozed(engine, info.id)
        assert (await engine.pause(info.id)).state is SandboxState.PAUSED
        assert (await engine.resume(info.id)).state is SandboxState.RUNNING
        assert (await engine.run(info.id, "cat /tmp/n")).stdout == b"1\n"
        await dozed(engine, info.id)
        snapshot = await engine.snapshot(info.id)
        copy = await engine.create(SandboxSpec(runtime="gvisor"), snapshot=snapshot.id)
        try:
            assert (await engine.run(copy.id, "cat /tmp/n")).stdout == b"1\n"
        finally:
            await engine.terminate(copy.id)
            await engine.delete_snapshot(snapshot.id)
        await dozed(engine, info.id)
        assert (await engine.hibernate(info.id)).state is SandboxState.HIBERNATED
        assert (await engine.run(info.id, "cat /tmp/n")).stdout == b"1\n"  # woken by its use
        await dozed(engine, info.id)
    finally:
        await engine.terminate(info.id)
    assert not engine.registry.get(info.id).alive


async def test_a_sandbox_left_dozing_is_thawed_by_the_next_engine(data_dir: Path) -> None:
    require_runtime("gvisor")
    first = await Engine(data_dir, doze_after=AFTER).start()
    info = await first.create(SandboxSpec(runtime="gvisor"))
    await dozed(first, info.id)
    record, runtime = first.registry.get(info.id), first.runtimes.get("gvisor")
    await first.close(keep_sandboxes=True)
    assert not runtime.dozing(record.plan)  # a graceful stop thaws what it leaves running
    runtime.doze(record.plan)  # as an engine killed while it dozed leaves it
    async with Engine(data_dir, doze_after=None) as second:  # it never dozes anything itself
        try:
            assert not dozing(second, info.id)
            await second.registry.get(info.id).link.wait_connected(HANG)
            assert (await second.run(info.id, "echo back")).stdout == b"back\n"
        finally:
            await second.terminate(info.id)


async def test_namespaces_sandboxes_never_doze(engine: Engine) -> None:
    """An idle bubblewrap sandbox sleeps in the kernel and costs nothing: no need."""
    require_runtime("namespaces")
    info = await engine.create(SandboxSpec(runtime="namespaces"))
    try:
        await asyncio.sleep(AFTER * 4)
        assert not dozing(engine, info.id)
        assert engine.registry.get(info.id).link.waker is None
    finally:
        await engine.terminate(info.id)


async def test_a_thaw_that_fails_is_a_clear_error_and_the_next_use_retries(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = await engine.create(SandboxSpec(runtime="gvisor"))
    try:
        await dozed(engine, info.id)
        runtime = engine.runtimes.get("gvisor")

        def broken(_plan: object) -> None:
            raise OSError("the freezer is gone")

        monkeypatch.setattr(runtime, "wake", broken)
        with pytest.raises(SandboxFailed) as failed:
            await engine.run(info.id, "true")
        assert failed.value.code == "thaw_failed" and "the freezer is gone" in failed.value.message
        assert dozing(engine, info.id)
        monkeypatch.undo()
        assert (await engine.run(info.id, "echo up")).stdout == b"up\n"
    finally:
        await engine.terminate(info.id)
