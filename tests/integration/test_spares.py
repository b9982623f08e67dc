"""Spare disks (`corral.host.spares`, `corral.engine.spares`): quota disks formatted before the
creates that take them. Real mkfs, loop devices and mounts; the last test a real engine.

What must hold: a spare is taken once, by one create, and mounts as a new, empty disk would;
only spares this object made are ever taken; a closing engine leaves none behind.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.core.spec import SandboxSpec
from corral.engine import Engine
from corral.host import mounts
from corral.host.spares import KEEP, SpareDisks
from tests.conftest import require_runtime, wait_until


@pytest.fixture
def place(data_dir: Path) -> Iterator[Path]:
    """A directory of its own on the data directory's filesystem."""
    directory = data_dir / "test-spares" / uuid.uuid4().hex
    directory.mkdir(parents=True)
    yield directory
    mounts.remove_tree(directory)


def test_a_spare_is_taken_once_and_mounts_as_a_new_disk(place: Path) -> None:
    spares = SpareDisks(place / "spares")
    first, second = place / "first.img", place / "second.img"
    assert not spares.take(64, first)  # none yet: the create formats its own
    assert spares.wanted() == 64  # and the next ones are of its size
    for _ in range(KEEP):
        spares.make(64)
    assert spares.wanted() is None
    assert spares.take(64, first) and spares.take(64, second)
    assert not spares.take(64, place / "third.img")  # each spare went to one create
    assert not list((place / "spares").iterdir())
    assert first.stat().st_ino != second.stat().st_ino
    mounts.create_disk(first, 64, place / "mnt", formatted=True)
    try:
        assert sorted(p.name for p in (place / "mnt").iterdir()) == ["lost+found"]
        (place / "mnt" / "file").write_text("written")
        size = os.statvfs(place / "mnt")
        assert 56 << 20 < size.f_blocks * size.f_frsize <= 64 << 20  # the quota: its size
    finally:
        mounts.unmount(place / "mnt")
    assert spares.taken == 2


def test_only_spares_it_made_are_taken(place: Path) -> None:
    """A file a previous engine left (or one being written when it died) is never handed
    to a sandbox; the first spare this one makes clears them."""
    (place / "spares").mkdir()
    left = place / "spares" / "64-0000000000000000.img"
    mounts.format_disk(left, 64)
    spares = SpareDisks(place / "spares")
    assert not spares.take(64, place / "disk.img")
    spares.make(64)
    assert not left.exists()
    assert [p.name for p in (place / "spares").iterdir()] != [left.name]


def test_spares_of_a_size_no_longer_asked_for_are_dropped(place: Path) -> None:
    spares = SpareDisks(place / "spares")
    spares.take(64, place / "disk.img")
    spares.make(64)
    assert not spares.take(128, place / "disk.img")  # another size: the 64 MiB spare goes
    assert not list((place / "spares").iterdir())
    assert spares.wanted() == 128
    spares.make(64)  # made for the old size while the new one was asked for: dropped
    assert not list((place / "spares").iterdir())
    spares.make(128)
    assert spares.take(128, place / "disk.img")
    spares.remove_all()
    assert not (place / "spares").exists()


async def test_an_engine_keeps_spares_for_cold_creates_and_removes_them_as_it_closes(
    data_dir: Path,
) -> None:
    require_runtime("namespaces")
    directory = data_dir.with_name(data_dir.name + "-spares")
    async with Engine(directory) as engine:
        spares = engine.runtimes.spares
        spec = SandboxSpec(runtime="namespaces", disk_mb=256)
        made = [await engine.create(spec)]
        await wait_until(lambda: spares.wanted() is None, "the spares are made")
        assert len(list((directory / "spares").iterdir())) == KEEP
        made.append(await engine.create(spec))
        try:
            assert spares.taken == 1
            result = await engine.run(made[1].id, "df -m / | tail -1; touch /new && echo ok")
            assert 224 < int(result.stdout.split()[1]) <= 256  # MiB: the quota asked for
            assert result.stdout.split()[-1] == b"ok"
        finally:
            for info in made:
                await engine.terminate(info.id)
    assert not (directory / "spares").exists()
    shutil.rmtree(directory, ignore_errors=True)
