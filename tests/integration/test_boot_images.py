"""Boot images on a real engine (gvisor): new sandboxes restored from a saved boot are fresh,
named for themselves, and hold no more privilege than booted ones."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from corral.agent import protocol as P
from corral.core.errors import CorralError
from corral.core.spec import SandboxSpec, VolumeMount
from corral.engine import Engine
from tests.conftest import proc_status, require_runtime, wait_until

CAP_SYS_ADMIN = 1 << 21


@pytest.fixture(autouse=True)
def gvisor() -> None:
    require_runtime("gvisor")


async def boot_images(engine: Engine, count: int) -> None:
    """Wait until the engine holds `count` boot images (the bound only catches hangs)."""
    for _ in range(1200):
        if engine.boots.to_dict()["images"] == count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never {count} boot images: {engine.boots.to_dict()}")


def caps(status: str, field: str) -> int:
    line = next(line for line in status.splitlines() if line.startswith(field + ":"))
    return int(line.split()[1], 16)


async def test_sandboxes_restored_from_a_boot_image_are_fresh_and_their_own(
    engine: Engine,
) -> None:
    booted = await engine.create(SandboxSpec(runtime="gvisor"))
    await boot_images(engine, 1)
    (image,) = engine.boots.store.all()
    assert "identify" not in engine.registry.get(booted.id).timings  # it booted
    restored = [
        await engine.create(SandboxSpec(runtime="gvisor", env={"N": str(i)})) for i in (1, 2)
    ]
    try:
        assert engine.boots.to_dict()["restored"] == 2
        await engine.files(restored[0].id).write("/root/mine", "x")
        for info in restored:
            record = engine.registry.get(info.id)
            assert "identify" in record.timings  # restored, not booted
            result = await engine.run(info.id, "hostname; echo $N; ls /root; ps -e -o comm=")
            lines = result.stdout.decode().split()
            assert lines[0] == info.id  # its own name, not the template's
            assert lines[1] == info.spec.env["N"]
            assert ("mine" in lines) == (info is restored[0])  # nothing of another sandbox
            assert lines[-2:] == ["python3", "ps"]  # the agent, and what this command started
            # No process holds the right to rename the sandbox: the agent gave it up, before
            # any use; nothing it starts ever had it.
            status = await engine.run(info.id, "cat /proc/[0-9]*/status")
            for field in ("CapEff", "CapPrm", "CapBnd"):
                held = [caps(s, field) for s in status.stdout.decode().split("Name:")[1:]]
                assert held and not any(c & CAP_SYS_ADMIN for c in held), field
            with pytest.raises(CorralError):
                await record.link.call(P.IDENTIFY, {"hostname": "taken-over", "secret": "00" * 32})
            assert (await engine.run(info.id, "hostname")).stdout.decode().strip() == info.id
            # Its agent's secret is its own, not the image's, and its agent dials back with it.
            assert record.link.secret not in (image.agent_secret, None)
            await record.link.quiesce()
            await record.link.listen()
            assert (await engine.run(info.id, "echo back")).stdout == b"back\n"
        secrets = {engine.registry.get(info.id).link.secret for info in restored}
        assert len(secrets) == 2
        # A booted sandbox's agent never could rename its sandbox.
        with pytest.raises(CorralError):
            await engine.registry.get(booted.id).link.call(
                P.IDENTIFY, {"hostname": "x", "secret": "00" * 32}
            )
    finally:
        for info in (booted, *restored):
            await engine.terminate(info.id)


async def test_the_reaper_is_a_sandboxs_parent_booted_or_restored(engine: Engine) -> None:
    """runsc leaves a sandbox's processes to the engine's reaper (runtimes/reaper.c), not to
    the host's init: they are reaped as they end, and terminate does not wait for the init."""
    booted = await engine.create(SandboxSpec(runtime="gvisor"))
    await boot_images(engine, 1)
    restored = await engine.create(SandboxSpec(runtime="gvisor"))
    assert "identify" in engine.registry.get(restored.id).timings
    for info in (booted, restored):
        launch = engine.registry.get(info.id).launch
        assert launch is not None
        reaper = int(proc_status(launch.pid)["PPid"])
        assert proc_status(reaper)["Name"] == "reaper"
        await engine.terminate(info.id)
        assert proc_status(launch.pid) == {}  # reaped
        await wait_until(
            lambda: proc_status(reaper).get("State", "Z").startswith(("Z", "X")),  # noqa: B023
            "the reaper ends with its sandbox",
        )


async def test_a_boot_image_that_fails_to_restore_is_dropped_and_the_sandbox_boots(
    engine: Engine,
) -> None:
    await engine.terminate((await engine.create(SandboxSpec(runtime="gvisor"))).id)
    await boot_images(engine, 1)
    (image,) = engine.boots.store.all()
    for page_file in image.path.glob("pages*.img"):
        page_file.write_bytes(b"not a memory image")
    info = await engine.create(SandboxSpec(runtime="gvisor"))
    try:
        assert "identify" not in engine.registry.get(info.id).timings  # booted after all
        assert (await engine.run(info.id, "hostname")).stdout.decode().strip() == info.id
        assert engine.boots.to_dict()["images"] == 0
        assert engine.boots.to_dict()["restored"] == 0
        assert engine.boots.store.all() == []
    finally:
        await engine.terminate(info.id)


async def test_only_sandboxes_that_can_be_saved_ask_for_one(engine: Engine) -> None:
    """Internet sandboxes cannot be checkpointed, volumes are mounted at start and namespaces
    sandboxes have no memory images: none of them asks for a boot image."""
    require_runtime("namespaces")
    volume = await engine.create_volume(16)
    for spec in (
        SandboxSpec(runtime="gvisor", network="internet"),
        SandboxSpec(runtime="gvisor", volumes=(VolumeMount("/data", volume.id),)),
        SandboxSpec(runtime="namespaces"),
    ):
        info = await engine.create(spec)
        await engine.terminate(info.id)
        assert engine.boots.to_dict() == {"enabled": True, "images": 0, "made": 0, "restored": 0}
        assert not engine.boots._pending
    await engine.delete_volume(volume.id)


async def test_an_engine_without_boot_images_boots_every_sandbox(data_dir: Path) -> None:
    async with Engine(data_dir, boot_images=False) as engine:
        for _ in range(2):
            info = await engine.create(SandboxSpec(runtime="gvisor"))
            assert "identify" not in engine.registry.get(info.id).timings
            await engine.terminate(info.id)
        assert not engine.boots._pending and engine.boots.to_dict()["made"] == 0


async def test_the_template_sandbox_is_shown_nowhere(data_dir: Path) -> None:
    changes: list[str] = []
    async with Engine(data_dir, on_change=lambda info: changes.append(info.id)) as engine:
        info = await engine.create(SandboxSpec(runtime="gvisor"))
        await boot_images(engine, 1)  # its template booted and ended meanwhile
        assert [s.id for s in engine.list_sandboxes()] == [info.id]
        await engine.terminate(info.id)
    assert set(changes) == {info.id}
