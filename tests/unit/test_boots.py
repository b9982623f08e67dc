"""Boot images' bookkeeping: which configurations share one, and when one is asked for."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from corral.core.errors import SandboxFailed
from corral.core.models import SnapshotInfo
from corral.core.spec import SandboxSpec, VolumeMount
from corral.engine import boots
from corral.engine.boots import BootImages, boot_key, key_for
from corral.engine.sealing import KeyRing
from corral.engine.snapshots import Snapshot, SnapshotStore
from corral.engine.tasks import Tasks
from corral.images.store import HostBind, RootImage

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


def test_only_sandboxes_that_can_be_saved_from_images_not_built_by_tenants_have_keys() -> None:
    debian = RootImage("debian", (Path(LAYERS[0]),))
    spec = SandboxSpec(runtime="gvisor")
    assert key_for(spec, debian, None) == boot_key(spec, LAYERS, [])
    host = RootImage("host", (Path(LAYERS[0]),), (HostBind(Path("/usr"), "/usr"),))
    assert key_for(spec, host, None) == boot_key(spec, LAYERS, [("/usr", "/usr")])
    assert key_for(spec, debian, "runsc cannot checkpoint a sandbox with internet access") is None
    volumes = SandboxSpec(runtime="gvisor", volumes=(VolumeMount("/data", "vol-1"),))
    assert key_for(volumes, debian, None) is None
    # A tenant's image: its python3 would be the template's agent.
    assert key_for(spec, RootImage("im-0123456789abcdef", (Path(LAYERS[0]),)), None) is None


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
    images = BootImages(
        tmp_path / "boots", KeyRing(path=tmp_path / "key", create=True), Tasks(), maker
    )
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
    images = BootImages(
        tmp_path / "boots", KeyRing(path=tmp_path / "key", create=True), Tasks(), maker
    )
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
    off = BootImages(tmp_path / "off", KeyRing(path=tmp_path / "key", create=True), Tasks(), maker)
    off.enabled = False
    off.start(quiet)
    off.want(boot_key(SandboxSpec(runtime="gvisor"), LAYERS, []), SandboxSpec())
    assert not off._pending


class Saver:
    """Stands in for the engine's boot: saves a small image for real, under the key asked
    for or another one (an image rebuilt while its template booted)."""

    def __init__(self) -> None:
        self.rebuilt: tuple | None = None

    async def __call__(self, spec: SandboxSpec, store: SnapshotStore) -> tuple[Snapshot, tuple]:
        with store.writing() as (snapshot_id, temp):
            (temp / "pages.img").write_bytes(b"memory")
            info = SnapshotInfo(snapshot_id, "sb-template", "gvisor", spec.image, 0.0, None, 0)
            image = store.commit(temp, info, spec, b"s" * 32)
        return image, self.rebuilt or boot_key(spec, LAYERS, [])


def spec_of(memory_mb: int) -> SandboxSpec:
    return SandboxSpec(runtime="gvisor", memory_mb=memory_mb)


async def test_images_are_kept_by_key_and_the_least_recently_used_makes_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(boots, "MAX_IMAGES", 2)
    saver = Saver()
    images = BootImages(
        tmp_path / "boots", KeyRing(path=tmp_path / "key", create=True), Tasks(), saver
    )
    images.store.load()
    images.start(quiet)
    keys = [boot_key(spec_of(m), LAYERS, []) for m in (256, 512, 1024)]
    for key, memory in zip(keys[:2], (256, 512), strict=True):
        images.want(key, spec_of(memory))
        await asyncio.gather(*images._pending)
    first, second = images.find(keys[0]), images.find(keys[1])
    assert first is not None and second is not None and first.path.is_dir()
    assert images.find(keys[0]) is first  # now the most recently used
    images.want(keys[2], spec_of(1024))  # at the limit: the second makes way
    await asyncio.gather(*images._pending)
    assert images.find(keys[1]) is None and not second.path.exists()
    assert images.find(keys[2]) is not None and images.find(keys[0]) is first
    assert images.to_dict()["made"] == 3
    # An image that fails to restore is dropped, and its configuration asked for again later.
    assert images.discard(keys[0]) and not first.path.exists()
    images.want(keys[0], spec_of(256))
    assert not images._pending
    await images.stop()
    assert not images.discard(keys[2])  # closing: boot nothing more


async def test_an_image_rebuilt_meanwhile_is_kept_under_its_own_key(tmp_path: Path) -> None:
    saver = Saver()
    saver.rebuilt = boot_key(SandboxSpec(runtime="gvisor"), ["/data/images/rebuilt"], [])
    images = BootImages(
        tmp_path / "boots", KeyRing(path=tmp_path / "key", create=True), Tasks(), saver
    )
    images.store.load()
    images.start(quiet)
    asked = boot_key(SandboxSpec(runtime="gvisor"), LAYERS, [])
    images.want(asked, SandboxSpec(runtime="gvisor"))
    await asyncio.gather(*images._pending)
    assert images.find(asked) is None and images.find(saver.rebuilt) is not None
    saver.rebuilt = None
    images.want(asked, SandboxSpec(runtime="gvisor"))  # asked again, at once
    await asyncio.gather(*images._pending)
    assert images.find(asked) is not None


async def test_any_failure_to_make_one_is_retried_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(spec: SandboxSpec, store: SnapshotStore) -> tuple[Snapshot, tuple]:
        raise OSError(28, "No space left on device")

    images = BootImages(
        tmp_path / "boots", KeyRing(path=tmp_path / "key", create=True), Tasks(), broken
    )
    images.start(quiet)
    key = boot_key(SandboxSpec(runtime="gvisor"), LAYERS, [])
    images.want(key, SandboxSpec(runtime="gvisor"))
    await asyncio.gather(*images._pending)
    images.want(key, SandboxSpec(runtime="gvisor"))
    assert not images._pending  # not at once
    monkeypatch.setattr(boots, "RETRY_AFTER", 0.0)
    images.want(key, SandboxSpec(runtime="gvisor"))
    assert images._pending
    await asyncio.gather(*images._pending)


def test_without_a_memory_filesystem_there_are_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host where the engine cannot mount one (no CAP_SYS_ADMIN in a container): the engine
    starts all the same, and every sandbox boots."""

    def refused(target: Path) -> None:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(boots.mounts, "private_tmpfs", refused)
    images = BootImages(
        tmp_path / "boots", KeyRing(path=tmp_path / "key", create=True), Tasks(), Saver()
    )
    images.prepare()
    images.start(quiet)
    assert not images.enabled
    images.want(boot_key(SandboxSpec(runtime="gvisor"), LAYERS, []), SandboxSpec())
    assert not images._pending


def test_the_agent_takes_a_secret_of_the_protocols_size() -> None:
    from corral.agent import protocol, shield

    assert shield._SECRET_BYTES == protocol.SECRET_BYTES
    with pytest.raises(ValueError, match="secret"):
        shield.take_identity("sb-x", "00" * 31)
    with pytest.raises(ValueError, match="hostname"):
        shield.take_identity("", "00" * 32)
