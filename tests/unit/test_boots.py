"""Boot images' bookkeeping: which configurations share one, and when one is asked for."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from corral.core.errors import SandboxFailed
from corral.core.spec import SandboxSpec
from corral.engine import boots
from corral.engine.boots import BootImages, boot_key
from corral.engine.sealing import KeyRing
from corral.engine.snapshots import Snapshot, SnapshotStore
from corral.engine.tasks import Tasks

LAYERS = ["/data/images/debian/rootfs"]


def test_what_is_fixed_at_start_and_the_layers_make_the_key() -> None:
    base = boot_key(SandboxSpec(runtime="gvisor"), LAYERS, [])
    # What each command or the lifetime carries does not matter...
    same = SandboxSpec(runtime="gvisor", env={"A": "1"}, metadata={"m": "x"}, timeout=60)
    assert boot_key(same, LAYERS, []) == base
    # ...what the sandbox is started with does, and so do the image's layers and binds.
    for other in (
        boot_key(SandboxSpec(runtime="gvisor", memory_mb=1024), LAYERS, []),
        boot_key(SandboxSpec(runtime="gvisor", cpu=2.0), LAYERS, []),
        boot_key(SandboxSpec(runtime="gvisor", image="python"), LAYERS, []),
        boot_key(SandboxSpec(runtime="gvisor"), ["/data/images/rebuilt"], []),
        boot_key(SandboxSpec(runtime="gvisor"), LAYERS, [("/usr", "/usr")]),
    ):
        assert other != base


class Maker:
    """Stands in for the engine's boot: counts the asks, fails while told to."""

    def __init__(self) -> None:
        self.asked: list[SandboxSpec] = []
        self.fail = False

    async def __call__(self, spec: SandboxSpec, store: SnapshotStore) -> tuple[Snapshot, tuple]:
        self.asked.append(spec)
        if self.fail:
            raise SandboxFailed("no")
        raise AssertionError("not reached in these tests")


async def quiet() -> None:
    return None


async def test_a_configuration_is_asked_for_once_and_retried_only_after_a_while(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    maker = Maker()
    maker.fail = True
    images = BootImages(tmp_path / "boots", KeyRing(path=tmp_path / "key"), Tasks(), maker)
    key = boot_key(SandboxSpec(runtime="gvisor"), LAYERS, [])
    images.want(key, SandboxSpec(runtime="gvisor"))
    assert maker.asked == []  # nothing before the engine says when it may
    images.start(quiet)
    for _ in range(3):
        images.want(key, SandboxSpec(runtime="gvisor"))
        await asyncio.sleep(0)
    await asyncio.gather(*images._pending)
    assert len(maker.asked) == 1  # failed: not asked again at once
    images.want(key, SandboxSpec(runtime="gvisor"))
    assert not images._pending
    monkeypatch.setattr(boots, "RETRY_AFTER", 0.0)
    images.want(key, SandboxSpec(runtime="gvisor"))
    await asyncio.gather(*images._pending)
    assert len(maker.asked) == 2


async def test_at_most_so_many_configurations_and_none_when_turned_off_or_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(boots, "MAX_IMAGES", 2)
    maker = Maker()
    images = BootImages(tmp_path / "boots", KeyRing(path=tmp_path / "key"), Tasks(), maker)
    images.start(quiet)
    gate = asyncio.Event()

    async def slow() -> None:
        await gate.wait()

    images.start(slow)  # the makes wait: they count as on their way
    for memory in (256, 512, 1024):
        spec = SandboxSpec(runtime="gvisor", memory_mb=memory)
        images.want(boot_key(spec, LAYERS, []), spec)
    assert len(images._pending) == 2
    await images.stop()
    assert not images._pending and maker.asked == []
    images.want(boot_key(SandboxSpec(runtime="gvisor"), LAYERS, []), SandboxSpec())
    assert not images._pending  # stopped
    off = BootImages(tmp_path / "off", KeyRing(path=tmp_path / "key"), Tasks(), maker)
    off.enabled = False
    off.start(quiet)
    off.want(boot_key(SandboxSpec(runtime="gvisor"), LAYERS, []), SandboxSpec())
    assert not off._pending
