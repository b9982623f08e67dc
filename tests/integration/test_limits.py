"""Limits that hold under abuse, bad specs that get clear errors, and nothing left behind."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from corral.core.errors import (
    Conflict,
    ImageNotFound,
    InvalidPath,
    InvalidRequest,
    LimitReached,
    RuntimeUnavailable,
    SandboxEnded,
)
from corral.core.models import SandboxInfo
from corral.core.spec import SandboxSpec
from corral.core.state import EndReason, SandboxState
from corral.engine import Engine
from tests.conftest import leftovers, require_runtime


async def test_memory_over_limit_kills_the_process_alone(engine: Engine, runtime: str) -> None:
    """Under every runtime: the process that outgrows the sandbox dies (137, oom_killed), and
    the sandbox, its other processes and its files live on. (gVisor's Sentry is one host
    process, which the host's OOM killer would take whole: the agent kills first.)"""
    info = await engine.create(SandboxSpec(runtime=runtime, memory_mb=256))
    try:
        await engine.files(info.id).write("/tmp/notes.txt", b"kept")
        bystander = await engine.run(info.id, "sleep 600 >/dev/null 2>&1 & echo $!")
        hog = "x = bytearray(600 * 1024 * 1024); print('survived')"
        result = await engine.run(info.id, ["python3", "-c", hog], timeout=120)
        assert b"survived" not in result.stdout
        assert result.oom_killed, result
        assert (result.exit_code, result.signal) == (137, 9)
        assert engine.get(info.id).state is SandboxState.RUNNING
        assert await engine.files(info.id).read_bytes("/tmp/notes.txt") == b"kept"
        pid = bystander.stdout.decode().strip()
        alive = await engine.run(info.id, f"kill -0 {pid} && echo alive")
        assert alive.stdout == b"alive\n"
        # A process that stays within the budget is not blamed for anything.
        fits = await engine.run(info.id, ["python3", "-c", "x = bytearray(64 << 20)"])
        assert (fits.exit_code, fits.oom_killed) == (0, False)
    finally:
        await engine.terminate(info.id)


async def test_memory_files_past_the_budget_end_a_gvisor_sandbox_saying_so(engine: Engine) -> None:
    """Files in a memory filesystem past the budget: killing processes would free nothing,
    so none is killed and the host's limit ends the sandbox, as out_of_memory.

    The file grows in steps under gVisor; on a loaded machine the agent may look while it is
    barely over, when killing the writer does bring the sandbox back under its budget (as a
    kernel's OOM killer would). That outcome is reported too: the writer is oom_killed and the
    sandbox lives on within its budget. (tests/unit/test_agent_memory.py holds the rule itself.)
    """
    require_runtime("gvisor")
    info = await engine.create(SandboxSpec(runtime="gvisor", memory_mb=256))
    try:
        fill = "fallocate -l 1G /dev/shm/fill; sleep 60"
        try:
            result = await engine.run(info.id, fill, timeout=120)
        except SandboxEnded as ended:
            assert "out_of_memory" in ended.message
            assert engine.get(info.id).end_reason is EndReason.OUT_OF_MEMORY
        else:
            assert result.oom_killed, result
            assert engine.get(info.id).state is SandboxState.RUNNING
    finally:
        await engine.terminate(info.id)


BOMB = "bomb() { bomb | bomb & }; bomb"
SPAWNER = """
import os, time
while True:
    try:
        if os.fork() == 0:
            time.sleep(1000)
            os._exit(0)
    except OSError:
        time.sleep(0.01)
"""


async def usable(engine: Engine, sandbox_id: str) -> None:
    """The sandbox runs commands again, with only a handful of processes in it."""
    after = await engine.run(sandbox_id, "echo alive; ps -e --no-headers | wc -l", timeout=30)
    word, count = after.stdout.split()
    assert word == b"alive"
    assert int(count) < 8, after.stdout


async def test_fork_bomb_ends_with_its_command(engine: Engine, runtime: str) -> None:
    info = await engine.create(SandboxSpec(runtime=runtime, max_processes=64))
    try:
        result = await engine.run(info.id, f"{BOMB}; sleep 600", timeout=5)
        assert result.timed_out
        # The host is unaffected: it still starts processes at once.
        assert subprocess.run(["true"], check=False, timeout=10).returncode == 0
        await usable(engine, info.id)
        # What a command left behind when it ended (here a detached spawner that keeps the
        # sandbox at its process limit) is the sandbox's own; kill_all is the way back.
        await engine.run(info.id, f"setsid -f python3 -c '{SPAWNER}'", timeout=30)
        with pytest.raises(LimitReached) as full:
            for _ in range(100):  # until the spawner has filled the sandbox
                await engine.run(info.id, "true", timeout=30)
                await asyncio.sleep(0.1)
        assert "process limit" in full.value.message
        assert await engine.kill_all(info.id) > 32
        await usable(engine, info.id)
        assert engine.get(info.id).state is SandboxState.RUNNING
    finally:
        await engine.terminate(info.id)


async def test_disk_quota_gives_enospc(engine: Engine, runtime: str) -> None:
    info = await engine.create(SandboxSpec(runtime=runtime, disk_mb=64, memory_mb=512))
    try:
        result = await engine.run(
            info.id, "dd if=/dev/zero of=/root/fill bs=1M count=200", timeout=120
        )
        assert result.exit_code != 0
        assert b"No space left on device" in result.stderr
        # The sandbox itself is fine, and the space comes back when the file goes.
        assert (
            await engine.run(info.id, "rm /root/fill && echo ok > /root/x && cat /root/x")
        ).stdout == b"ok\n"
    finally:
        await engine.terminate(info.id)


async def test_cpu_quota_is_enforced(engine: Engine, runtime: str) -> None:
    info = await engine.create(SandboxSpec(runtime=runtime, cpu=0.2))
    try:
        burn = (
            "import time, os\n"
            "start = time.time()\n"
            "while time.time() - start < 2: pass\n"
            "t = os.times()\n"
            "print(t.user + t.system)\n"
        )
        result = await engine.run(info.id, ["python3", "-c", burn], timeout=60)
        used = float(result.stdout)
        # 2 s of wall time at 0.2 CPU is about 0.4 s of CPU; unlimited it would be 2 s.
        assert used < 1.0, f"used {used:.2f} s of CPU in 2 s with cpu=0.2"
    finally:
        await engine.terminate(info.id)


@pytest.mark.parametrize(
    ("fields", "error", "code"),
    [
        ({"memory_mb": -1}, InvalidRequest, "invalid_request"),
        ({"memory_mb": 10**12}, InvalidRequest, "invalid_request"),
        ({"cpu": 0}, InvalidRequest, "invalid_request"),
        ({"cpu": float("nan")}, InvalidRequest, "invalid_request"),
        ({"disk_mb": 1}, InvalidRequest, "invalid_request"),
        ({"max_processes": 0}, InvalidRequest, "invalid_request"),
        ({"timeout": 24 * 3600 + 1}, InvalidRequest, "invalid_request"),
        ({"timeout": 0}, InvalidRequest, "invalid_request"),
        ({"network": "everything"}, InvalidRequest, "invalid_request"),
        ({"workdir": "relative"}, InvalidPath, "invalid_path"),
        ({"workdir": "/tmp/\0"}, InvalidPath, "invalid_path"),
        ({"env": {"1BAD": "x"}}, InvalidRequest, "invalid_request"),
        ({"env": {"OK": "nul\0"}}, InvalidRequest, "invalid_request"),
    ],
)
def test_invalid_specs_are_rejected(
    fields: dict[str, object], error: type[Exception], code: str
) -> None:
    with pytest.raises(error) as raised:
        SandboxSpec(**fields)  # type: ignore[arg-type]
    assert raised.value.code == code  # type: ignore[attr-defined]
    assert raised.value.message  # type: ignore[attr-defined]


async def test_bad_creates_leave_nothing_behind(engine: Engine, data_dir: Path) -> None:
    before = leftovers(data_dir)
    with pytest.raises(RuntimeUnavailable) as unknown:
        await engine.create(SandboxSpec(runtime="firecracker"))
    assert unknown.value.code == "unknown_runtime"
    with pytest.raises(ImageNotFound):
        await engine.create(SandboxSpec(image="no-such-image"))
    # A second engine needs its own data directory: the fixture's engine holds this one.
    broken = Engine(data_dir.with_name(data_dir.name + "-broken"), runsc_path="/nonexistent/runsc")
    async with broken:
        with pytest.raises(RuntimeUnavailable) as unavailable:
            await broken.create(SandboxSpec(runtime="gvisor"))
        assert "runsc" in unavailable.value.message
    assert leftovers(data_dir) == before


async def test_runtime_failure_leaves_nothing_behind(
    engine: Engine, data_dir: Path, runtime: str
) -> None:
    before = leftovers(data_dir)
    # An image whose root has no python3 for the agent: the runtime starts, the agent cannot.
    empty = data_dir / "images" / "empty-for-test" / "rootfs"
    empty.mkdir(parents=True, exist_ok=True)
    engine.images.register("empty-for-test", empty)
    with pytest.raises(Exception) as failed:
        await engine.create(SandboxSpec(runtime=runtime, image="empty-for-test"))
    assert failed.value.code in ("runtime_failed", "agent_unavailable")  # type: ignore[attr-defined]
    assert leftovers(data_dir) == before


async def ended_info(engine: Engine, sandbox_id: str) -> SandboxInfo:
    """The sandbox's info once it has ended (the bound only catches hangs)."""
    for _ in range(400):
        if engine.get(sandbox_id).state is SandboxState.TERMINATED:
            break
        await asyncio.sleep(0.05)
    return engine.get(sandbox_id)


async def test_lifetime_timeout_ends_the_sandbox(engine: Engine, runtime: str) -> None:
    info = await engine.create(SandboxSpec(runtime=runtime, timeout=2))
    ended = await ended_info(engine, info.id)
    assert ended.state is SandboxState.TERMINATED
    assert ended.end_reason is EndReason.TIMEOUT
    assert [h.state for h in ended.history] == [
        SandboxState.CREATING,
        SandboxState.RUNNING,
        SandboxState.TERMINATED,
    ]


async def test_set_timeout_extends_the_lifetime(engine: Engine, runtime: str) -> None:
    info = await engine.create(SandboxSpec(runtime=runtime, timeout=2))
    await engine.set_timeout(info.id, 60)
    await asyncio.sleep(3)
    assert engine.get(info.id).state is SandboxState.RUNNING
    with pytest.raises(InvalidRequest):
        await engine.set_timeout(info.id, 24 * 3600 + 1)
    await engine.terminate(info.id)


async def test_agent_death_is_recorded(engine: Engine, runtime: str) -> None:
    """SIGKILL from inside: bubblewrap's kernel drops it (the agent is pid 1); gVisor delivers
    it, and the sandbox ends with the reason (see tests/isolation/test_agent_channel.py)."""
    info = await engine.create(SandboxSpec(runtime=runtime))
    await engine.exec(info.id, cmd="sleep 0.2; kill -9 $(pgrep -f /run/corral/agent/start.py)")
    if runtime == "namespaces":
        await asyncio.sleep(1)
        assert (await engine.run(info.id, "echo alive")).stdout == b"alive\n"
        await engine.terminate(info.id)
        return
    ended = await ended_info(engine, info.id)
    assert ended.state is SandboxState.TERMINATED
    assert ended.end_reason in (EndReason.RUNTIME_ERROR, EndReason.EXITED)


async def test_pause_and_resume(engine: Engine, runtime: str) -> None:
    info = await engine.create(SandboxSpec(runtime=runtime, auto_resume=False))
    try:
        proc = await engine.exec(
            info.id,
            [
                "python3",
                "-c",
                "import time\nfor i in range(100):\n print(i, flush=True); time.sleep(0.05)",
            ],
        )
        await asyncio.sleep(0.5)
        await engine.pause(info.id)
        assert engine.get(info.id).state is SandboxState.PAUSED
        with pytest.raises(Exception) as paused:
            await engine.run(info.id, "true")
        assert paused.value.code == "invalid_state"  # type: ignore[attr-defined]
        await asyncio.sleep(1)
        await engine.resume(info.id)
        result = await proc.wait()
        assert result.stdout.split()[-1] == b"99"  # it carried on where it stopped
    finally:
        await engine.terminate(info.id)
    assert os.path.exists("/proc/self")  # the host is fine


async def test_concurrent_creates_get_their_own_identity(engine: Engine, runtime: str) -> None:
    infos = await asyncio.gather(
        *(engine.create(SandboxSpec(runtime=runtime, network="internet")) for _ in range(4))
    )
    try:
        sandboxes = [engine.registry.get(info.id) for info in infos]
        assert len({sb.plan.uid_slot for sb in sandboxes}) == 4
        assert len({sb.plan.network.index for sb in sandboxes}) == 4
        results = await asyncio.gather(*(engine.run(info.id, "hostname") for info in infos))
        assert [r.stdout.decode().strip() for r in results] == [info.id for info in infos]
    finally:
        await asyncio.gather(*(engine.terminate(info.id) for info in infos))


async def test_engine_shutdown_ends_sandboxes_with_that_reason(
    data_dir: Path, runtime: str
) -> None:
    engine = Engine(data_dir)
    async with engine:
        info = await engine.create(SandboxSpec(runtime=runtime))
    ended = engine.get(info.id)
    assert ended.state is SandboxState.TERMINATED
    assert ended.end_reason is EndReason.ENGINE_SHUTDOWN
    assert info.id not in leftovers(data_dir)["dirs"]


async def test_one_engine_per_data_directory(engine: Engine, data_dir: Path) -> None:
    """A second engine is refused before it touches anything of the first's: a snapshot being
    written (its temporary directory) and the agent's code stay as they are."""
    writing = data_dir / "snapshots" / ".tmp-sn-beingwritten00"
    writing.mkdir()
    guest = data_dir / "agent" / "guest.py"
    installed = guest.read_bytes()
    guest.write_bytes(installed + b"# the running engine's\n")
    try:
        second = Engine(data_dir)
        with pytest.raises(Conflict) as caught:
            await second.start()
        assert caught.value.code == "data_dir_in_use"
        assert writing.is_dir()
        assert guest.read_bytes().endswith(b"# the running engine's\n")
    finally:
        guest.write_bytes(installed)
        writing.rmdir()
