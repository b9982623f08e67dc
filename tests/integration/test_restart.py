"""The engine survives its own restart, graceful or `kill -9`, without losing sandboxes.

A later engine on the same data directory adopts what the previous one left running, ends
what outlived its lifetime, and records why a sandbox whose runtime died meanwhile ended.
Real sandboxes under every runtime; the only bounds on time are there to catch hangs.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import corral
from corral.core.errors import Conflict
from corral.core.models import SandboxInfo
from corral.core.spec import SandboxSpec
from corral.core.state import EndReason, SandboxState
from corral.engine import Engine
from corral.host.procs import process_start_time
from corral.host.scope import HostScope
from tests.conftest import leftovers, wait_until

HANG = 60.0  # seconds: only to catch hangs


@pytest.fixture(autouse=True)
async def cleanup(data_dir: Path) -> AsyncIterator[None]:
    """Whatever a failed test left running is adopted and ended by one more engine."""
    yield
    async with Engine(data_dir):
        pass


def record(data_dir: Path, sandbox_id: str) -> dict[str, object]:
    data: dict[str, object] = json.loads(
        (data_dir / "sandboxes" / sandbox_id / "sandbox.json").read_text()
    )
    return data


async def test_graceful_restart_adopts_running_sandboxes(data_dir: Path, runtime: str) -> None:
    before = leftovers(data_dir)
    first = Engine(data_dir)
    await first.start()
    info = await first.create(SandboxSpec(runtime=runtime))
    await first.files(info.id).write("/root/kept.txt", b"still here")
    sleeper = await first.exec(info.id, ["sleep", "1000"], tag="sleeper")
    await first.close(keep_sandboxes=True)
    assert info.id in leftovers(data_dir)["dirs"]
    assert record(data_dir, info.id)["state"] == "running"

    async with Engine(data_dir) as second:
        adopted = second.get(info.id)
        assert adopted.state is SandboxState.RUNNING
        assert (adopted.created_at, adopted.expires_at) == (info.created_at, info.expires_at)
        assert adopted.history == info.history
        assert (await second.run(info.id, "cat /root/kept.txt")).stdout == b"still here"
        processes = {p.id: p for p in await second.processes(info.id)}
        assert processes[sleeper.id].tag == "sleeper"
        assert processes[sleeper.id].running
        assert (await second.run(info.id, "echo hi")).stdout == b"hi\n"
        ended = await second.terminate(info.id)
        assert ended.end_reason is EndReason.USER
    assert leftovers(data_dir) == before


# The engine in its own process: it creates a sandbox, says its id, then waits to be killed.
ENGINE_SCRIPT = """
import asyncio, sys
from corral.engine import Engine
from corral.core.spec import SandboxSpec

async def main() -> None:
    engine = Engine(sys.argv[1])
    await engine.start()
    info = await engine.create(SandboxSpec(runtime=sys.argv[2]))
    await engine.run(info.id, "echo before > /root/before.txt")
    await engine.exec(info.id, cmd="sleep 1000")
    print(info.id, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_sandbox_survives_kill_9_of_its_engine(data_dir: Path, runtime: str) -> None:
    before = leftovers(data_dir)
    source = str(Path(corral.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")])}
    engine_process = subprocess.Popen(
        [sys.executable, "-c", ENGINE_SCRIPT, str(data_dir), runtime],
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert engine_process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(engine_process.stdout.readline), HANG)
        sandbox_id = line.decode().strip()
        assert sandbox_id.startswith("sb-"), f"the engine process said {line!r}"
    finally:
        engine_process.send_signal(signal.SIGKILL)
        engine_process.wait()
        if engine_process.stdout is not None:
            engine_process.stdout.close()

    async with Engine(data_dir) as engine:
        assert engine.get(sandbox_id).state is SandboxState.RUNNING
        result = await engine.run(sandbox_id, "cat /root/before.txt; echo after")
        assert result.stdout == b"before\nafter\n"
        sleepers = [p for p in await engine.processes(sandbox_id) if p.argv[-1] == "sleep 1000"]
        assert [p.running for p in sleepers] == [True]
        await engine.terminate(sandbox_id)
    assert leftovers(data_dir) == before


async def test_lifetime_runs_out_while_no_engine_runs(data_dir: Path, runtime: str) -> None:
    before = leftovers(data_dir)
    first = Engine(data_dir)
    await first.start()
    info = await first.create(SandboxSpec(runtime=runtime, timeout=3))
    await first.close(keep_sandboxes=True)
    assert info.expires_at is not None
    await asyncio.sleep(max(0.0, info.expires_at - time.time()) + 0.5)

    changes: list[SandboxInfo] = []
    async with Engine(data_dir, on_change=changes.append) as second:
        await wait_until(
            lambda: second.get(info.id).state is SandboxState.TERMINATED, "the sandbox ended"
        )
        ended = second.get(info.id)
        assert ended.end_reason is EndReason.TIMEOUT
        assert [(c.id, c.state) for c in changes] == [(info.id, SandboxState.TERMINATED)]
    assert leftovers(data_dir) == before


async def test_runtime_that_died_meanwhile_is_recorded_and_cleaned_up(
    data_dir: Path, runtime: str
) -> None:
    before = leftovers(data_dir)
    first = Engine(data_dir)
    await first.start()
    info = await first.create(SandboxSpec(runtime=runtime))
    await first.close(keep_sandboxes=True)
    pid = record(data_dir, info.id)["pid"]
    assert isinstance(pid, int)
    os.kill(pid, signal.SIGKILL)
    await wait_until(lambda: process_start_time(pid) is None, "the runtime process died")

    changes: list[SandboxInfo] = []
    async with Engine(data_dir, on_change=changes.append) as second:
        ended = second.get(info.id)
        assert ended.state is SandboxState.TERMINATED
        assert ended.end_reason is EndReason.RUNTIME_ERROR
        assert ended.end_detail and "while the engine was stopped" in ended.end_detail
        assert info.id not in leftovers(data_dir)["dirs"]
        assert [c.state for c in changes] == [SandboxState.TERMINATED]
    assert leftovers(data_dir) == before


async def test_a_corrupt_record_does_not_stop_the_engine(data_dir: Path) -> None:
    broken = {
        "sb-test-corrupt-json": "{not json",
        "sb-test-corrupt-shape": json.dumps({"id": "sb-test-corrupt-shape", "state": "running"}),
        "sb-test-corrupt-list": "[1, 2, 3]",
    }
    try:
        for name, text in broken.items():
            (data_dir / "sandboxes" / name).mkdir(parents=True)
            (data_dir / "sandboxes" / name / "sandbox.json").write_text(text)
        (data_dir / "sandboxes" / "sb-test-no-record").mkdir()
        async with Engine(data_dir) as engine:
            assert engine.list_sandboxes() == []
            info = await engine.create(SandboxSpec())
            assert (await engine.run(info.id, "echo ok")).stdout == b"ok\n"
            await engine.terminate(info.id)
    finally:
        for name in [*broken, "sb-test-no-record"]:
            shutil.rmtree(data_dir / "sandboxes" / name, ignore_errors=True)


async def test_on_change_sees_every_state(data_dir: Path, runtime: str) -> None:
    changes: list[SandboxInfo] = []

    def failing(info: SandboxInfo) -> None:
        changes.append(info)
        raise RuntimeError("a broken callback must not break the engine")

    async with Engine(data_dir, on_change=failing) as engine:
        info = await engine.create(SandboxSpec(runtime=runtime))
        await engine.pause(info.id)
        await engine.resume(info.id)
        await engine.terminate(info.id)
    assert [c.state for c in changes] == [
        SandboxState.RUNNING,
        SandboxState.PAUSED,
        SandboxState.RUNNING,
        SandboxState.TERMINATED,
    ]
    assert {c.id for c in changes} == {info.id}
    assert changes[-1].end_reason is EndReason.USER


async def test_paused_sandbox_is_adopted_paused(data_dir: Path, runtime: str) -> None:
    first = Engine(data_dir)
    await first.start()
    info = await first.create(SandboxSpec(runtime=runtime))
    await first.pause(info.id)
    await first.close(keep_sandboxes=True)
    async with Engine(data_dir) as second:
        assert second.get(info.id).state is SandboxState.PAUSED
        await second.resume(info.id)
        assert (await second.run(info.id, "echo awake")).stdout == b"awake\n"
        await second.terminate(info.id)


async def test_an_engine_in_another_host_scope_refuses_the_data_directory(
    data_dir: Path,
) -> None:
    """Sandboxes keep the host scope they were made in (their cgroups, interfaces and firewall
    table are named by it): an engine started in another scope on their data directory is
    refused with what to do, and takes or touches nothing, so the right one adopts them."""
    first = Engine(data_dir)
    await first.start()
    info = await first.create(SandboxSpec(runtime="namespaces"))
    await first.close(keep_sandboxes=True)
    wrong = Engine(data_dir, scope=HostScope(3))
    with pytest.raises(Conflict) as refused:
        await wrong.start()
    assert refused.value.code == "host_scope_mismatch"
    assert "host scope none (the whole host)" in str(refused.value)
    assert "start it with no --host-scope" in str(refused.value)
    await wrong.close()
    async with Engine(data_dir) as right:
        assert (await right.run(info.id, "echo still here")).stdout == b"still here\n"
        await right.terminate(info.id)
