"""A sandbox moves from one engine to another keeping its id (`corral.engine.moving`), as a
cluster's nodes move it: hibernated and handed off as a snapshot on one, the snapshot copied as
an archive, taken in and woken on the other with its memory and files. While it moves, the
engine it leaves refuses to change it; a move that fails leaves it where it was.

Two real engines on this machine, each its own data directory and host scope, sharing the
at-rest key and the built images, as a local cluster's nodes do; real gVisor sandboxes."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from corral.core.errors import CorralError
from corral.core.spec import SandboxSpec
from corral.core.state import SandboxState
from corral.engine import Engine, HostScope
from corral.engine.sealing import KEY_FILE
from tests.conftest import require_runtime
from tests.e2e.test_lifecycle import COUNTER

HANG = 60.0  # seconds: only to catch hangs
SCOPES = (6, 7)  # host scopes no other test uses


@pytest.fixture
async def engines(data_dir: Path) -> AsyncIterator[tuple[Engine, Engine]]:
    """Two engines, as two nodes of a cluster on one machine."""
    require_runtime("gvisor")
    dirs = [data_dir.with_name(f"{data_dir.name}-moving-{i}") for i in range(2)]
    for directory in dirs:
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(mode=0o711)
        (data_dir / "images").mkdir(exist_ok=True)
        (directory / "images").symlink_to(data_dir / "images")
    key = dirs[0] / KEY_FILE
    first = Engine(dirs[0], scope=HostScope(SCOPES[0]), boot_images=False, node="a")
    second = Engine(
        dirs[1], scope=HostScope(SCOPES[1]), at_rest_key=key, boot_images=False, node="b"
    )
    async with first, second:
        yield first, second
    for directory in dirs:
        shutil.rmtree(directory, ignore_errors=True)


async def copy_snapshot(source: Engine, target: Engine, snapshot_id: str, tmp: Path) -> None:
    """What the front does between the two: an archive, checked against its digest."""
    archive = tmp / "moving.tar"
    digest = await asyncio.to_thread(source.snapshots.pack, snapshot_id, archive)
    await asyncio.to_thread(target.snapshots.install, snapshot_id, archive, digest)


async def counted(engine: Engine, sandbox_id: str) -> int:
    return int((await engine.run(sandbox_id, "cat /root/count")).stdout)


async def test_a_sandbox_moves_with_its_memory_and_files_and_keeps_its_id(
    engines: tuple[Engine, Engine], tmp_path: Path
) -> None:
    a, b = engines
    made = await a.create(SandboxSpec(runtime="gvisor", timeout=600, metadata={"job": "7"}))
    sandbox_id = made.id
    await a.exec(sandbox_id, ["python3", "-c", COUNTER])
    await a.run(
        sandbox_id, "echo from-a > /root/note; while [ ! -s /root/count ]; do sleep 0.1; done"
    )
    before = await counted(a, sandbox_id)
    async with asyncio.timeout(HANG):
        taken, was = await a.moving.hand_off(sandbox_id, "b")
    assert was.state is SandboxState.RUNNING
    leaving = a.get(sandbox_id)
    assert leaving.state is SandboxState.HIBERNATED
    assert leaving.history[-1].reason == "moving to node b"
    # Leaving: nothing may wake, end or change it here meanwhile.
    for refused in (
        a.wake(sandbox_id),
        a.run(sandbox_id, "true"),
        a.terminate(sandbox_id),
        a.pause(sandbox_id),
    ):
        with pytest.raises(CorralError) as moving:
            await refused
        assert moving.value.status_code == 409 and moving.value.code == "sandbox_moving"
    assert taken.sandbox_id == sandbox_id and taken.owner is None
    await copy_snapshot(a, b, taken.id, tmp_path)
    async with asyncio.timeout(HANG):
        arrived = await b.moving.take_in(
            sandbox_id,
            taken.id,
            created_at=leaving.created_at,
            history=leaving.history,
            remaining=leaving.timeout_remaining,
        )
    assert arrived.id == sandbox_id and arrived.node == "b"
    assert arrived.state is SandboxState.HIBERNATED
    assert arrived.spec.metadata == {"job": "7"} and arrived.created_at == made.created_at
    assert b.list_snapshots() == []  # the copy became its checkpoint
    await a.moving.gone(sandbox_id)
    assert a.list_sandboxes() == [] and a.list_snapshots() == []
    assert not (a.data_dir / "sandboxes" / sandbox_id).exists()
    # Woken on b: the same processes, their memory, its files.
    async with asyncio.timeout(HANG):
        woken = await b.wake(sandbox_id)
    assert woken.state is SandboxState.RUNNING
    assert woken.timeout_remaining is None and woken.expires_at is not None
    assert (await b.run(sandbox_id, "cat /root/note")).stdout == b"from-a\n"
    after = await counted(b, sandbox_id)
    assert after >= before
    await asyncio.sleep(1)
    assert await counted(b, sandbox_id) > after  # the counter runs on
    answer = await b.run(sandbox_id, ["python3", "-c", PROBE])
    assert answer.stdout == b"still listening"  # its listener too
    await b.terminate(sandbox_id)


PROBE = (
    "import socket; print(socket.create_connection(('127.0.0.1', 7000)).recv(99).decode(), end='')"
)


async def test_a_failed_move_leaves_the_sandbox_where_it_was(
    engines: tuple[Engine, Engine],
) -> None:
    a, b = engines
    made = await a.create(SandboxSpec(runtime="gvisor", timeout=600))
    await a.run(made.id, "echo kept > /root/note")
    taken, _ = await a.moving.hand_off(made.id, "b")
    # The other engine never got the snapshot: it cannot take the sandbox in.
    with pytest.raises(CorralError) as missing:
        await b.moving.take_in(
            made.id, taken.id, created_at=made.created_at, history=made.history, remaining=None
        )
    assert missing.value.code == "snapshot_not_found"
    assert b.list_sandboxes() == []
    kept = await a.moving.stay(made.id)
    assert kept.state is SandboxState.HIBERNATED and a.list_snapshots() == []
    with pytest.raises(CorralError) as not_moving:
        await a.moving.gone(made.id)
    assert not_moving.value.code == "not_moving"
    assert (await a.run(made.id, "cat /root/note")).stdout == b"kept\n"  # woken on use
    await a.terminate(made.id)


async def test_what_cannot_move_is_refused_and_runs_on(engines: tuple[Engine, Engine]) -> None:
    a, _ = engines
    require_runtime("namespaces")
    made = await a.create(SandboxSpec(runtime="namespaces"))
    with pytest.raises(CorralError) as refused:
        await a.moving.hand_off(made.id, "b")
    assert refused.value.status_code == 400 and refused.value.code == "not_supported"
    assert (await a.run(made.id, "echo on")).stdout == b"on\n"
    volume = await a.create_volume(16)
    with_volume = await a.create(
        SandboxSpec.from_dict(
            {"runtime": "gvisor", "volumes": [{"volume": volume.id, "path": "/data"}]}
        )
    )
    with pytest.raises(CorralError) as local:
        await a.moving.hand_off(with_volume.id, "b")
    assert local.value.code == "not_movable"
    assert a.get(with_volume.id).state is SandboxState.RUNNING
    for sandbox in (made, with_volume):
        await a.terminate(sandbox.id)
    await a.delete_volume(volume.id)
