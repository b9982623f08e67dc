"""Volumes in the engine alone: host mounts follow their users, across concurrency and restarts.

Real sandboxes on the shared test data directory; the only bounds on time catch hangs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from corral.core.errors import InvalidRequest, VolumeInUse, VolumeNotFound
from corral.core.spec import SandboxSpec, VolumeMount
from corral.engine import Engine
from tests.conftest import leftovers


@pytest.fixture(autouse=True)
async def cleanup(data_dir: Path) -> AsyncIterator[None]:
    """Whatever a failed test left running is adopted and ended by one more engine."""
    yield
    async with Engine(data_dir):
        pass


def mounted(engine: Engine, volume_id: str) -> bool:
    point = str(engine.volumes.mountpoint(volume_id))
    return any(
        line.split()[4] == point for line in Path("/proc/self/mountinfo").read_text().splitlines()
    )


async def test_concurrent_sandboxes_share_one_host_mount(engine: Engine, runtime: str) -> None:
    volume = await engine.create_volume(16)
    assert not mounted(engine, volume.id)
    spec = SandboxSpec(runtime=runtime, volumes=(VolumeMount("/data", volume.id),))
    first, second = await asyncio.gather(engine.create(spec), engine.create(spec))
    assert mounted(engine, volume.id)
    assert sorted((await engine.volume(volume.id)).sandboxes) == sorted([first.id, second.id])
    wrote = await engine.run(first.id, "echo one > /data/f && stat -c %u /data/f")
    assert wrote.stdout == b"0\n", wrote.stderr
    assert (await engine.run(second.id, "cat /data/f")).stdout == b"one\n"
    with pytest.raises(VolumeInUse):
        await engine.delete_volume(volume.id)
    await engine.terminate(first.id)
    assert mounted(engine, volume.id)  # the other still uses it
    await engine.terminate(second.id)
    assert not mounted(engine, volume.id)
    used = (await engine.volume(volume.id)).used_bytes
    assert used > 0
    await engine.delete_volume(volume.id)
    with pytest.raises(VolumeNotFound):
        await engine.volume(volume.id)


async def test_engine_takes_ids_and_no_pools(engine: Engine) -> None:
    with pytest.raises(InvalidRequest) as by_name:
        await engine.create(SandboxSpec(volumes=(VolumeMount("/data", "by-name"),)))
    assert by_name.value.code == "invalid_id"
    with pytest.raises(VolumeNotFound):
        await engine.create(SandboxSpec(volumes=(VolumeMount("/data", "vol-0000000000000000"),)))
    with pytest.raises(InvalidRequest, match="pool"):
        engine.configure_pool(
            "p", SandboxSpec(volumes=(VolumeMount("/data", "vol-0000000000000000"),)), 1
        )
    assert engine.list_sandboxes(state="running") == []


async def test_a_restarted_engine_keeps_used_mounts_and_sweeps_the_rest(data_dir: Path) -> None:
    before = leftovers(data_dir)
    first = Engine(data_dir)
    await first.start()
    used, orphan = await first.create_volume(16), await first.create_volume(16)
    keeper = await first.create(
        SandboxSpec(runtime="namespaces", volumes=(VolumeMount("/data", used.id),))
    )
    await first.run(keeper.id, "echo kept > /data/f")
    # A volume mounted without a sandbox (as if its last sandbox ended during a crash).
    await first.volumes.acquire([orphan.id])
    await first.close(keep_sandboxes=True)
    assert mounted(first, used.id) and mounted(first, orphan.id)

    second = Engine(data_dir)
    await second.start()
    try:
        assert mounted(second, used.id)  # adopted with its sandbox
        assert not mounted(second, orphan.id)  # swept: nobody uses it
        assert (await second.run(keeper.id, "cat /data/f")).stdout == b"kept\n"
        await second.terminate(keeper.id)
        assert not mounted(second, used.id)
        again = await second.create(
            SandboxSpec(runtime="namespaces", volumes=(VolumeMount("/v", used.id, True),))
        )
        assert (await second.run(again.id, "cat /v/f")).stdout == b"kept\n"
        await second.terminate(again.id)
        for volume in (used, orphan):
            await second.delete_volume(volume.id)
    finally:
        await second.close()
    # Mounts and directories only: a gVisor sandbox of an earlier test may still be exiting.
    after = leftovers(data_dir)
    assert (after["mounts"], after["dirs"]) == (before["mounts"], before["dirs"])


async def test_a_create_with_volumes_never_takes_a_pooled_sandbox(engine: Engine) -> None:
    from tests.integration.test_pools import pool_of

    volume = await engine.create_volume(16)
    engine.configure_pool("warm", SandboxSpec(runtime="namespaces"), 1)
    await pool_of(engine, "warm", idle=1)
    info = await engine.create(
        SandboxSpec(runtime="namespaces", volumes=(VolumeMount("/data", volume.id),))
    )
    try:
        pool = await pool_of(engine, "warm", idle=1)
        assert pool["hits"] == 0  # started fresh, with the volume mounted
        assert (await engine.run(info.id, "echo ok > /data/f && cat /data/f")).stdout == b"ok\n"
    finally:
        await engine.terminate(info.id)
        engine.remove_pool("warm")
        await engine.delete_volume(volume.id)


async def test_shared_image_layers_get_no_mount_points(engine: Engine, runtime: str) -> None:
    """The mount points of a sandbox's binds (its volumes here) are the sandbox's own: the
    image's layers, shared by every sandbox, are read-only to everything a runtime runs, and
    never gain them (under gVisor the Gofer once made them inside the shared base layer)."""
    volume = await engine.create_volume(16)
    point = "/corral-mount-point-test"
    layer = Path(engine.images.resolve("debian").layers[0])
    spec = SandboxSpec(runtime=runtime, volumes=(VolumeMount(point, volume.id),))
    info = await engine.create(spec)
    try:
        assert (await engine.run(info.id, f"echo in > {point}/f && cat {point}/f")).ok
        assert (await engine.run(info.id, "test -d /run/corral/agent")).ok
        assert not (layer / point.lstrip("/")).exists()
    finally:
        await engine.terminate(info.id)
        await engine.delete_volume(volume.id)
    assert not (layer / point.lstrip("/")).exists()
