"""Quota disks on real loop devices (`corral.host.mounts`, `corral.host.loop`), no engine.

A disk is attached with ioctls, not `mount -o loop`: these check that the device goes away with
its mount, that a failed mount leaves nothing attached, and that concurrent attaches do not
take each other's device.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from corral.core.errors import SandboxFailed
from corral.host import mounts
from tests.conftest import wait_until


@pytest.fixture
def place(data_dir: Path) -> Iterator[Path]:
    """A directory of its own on the data directory's filesystem."""
    directory = data_dir / "test-disks" / uuid.uuid4().hex
    directory.mkdir(parents=True)
    yield directory
    mounts.unmount_all(sorted(mounts.mounts_under(directory), reverse=True))
    mounts.remove_tree(directory)


def detached(image: Path) -> bool:
    return mounts.loop_device_of(image) is None


async def test_a_new_disk_is_a_new_file_whatever_held_the_path(place: Path) -> None:
    """`create_disk` never formats a file that may be attached (`mount_disk(fresh=True)` does
    not look for its device): an old disk at the same path, still mounted, is left whole."""
    image, old, new = place / "disk.img", place / "old", place / "new"
    mounts.create_disk(image, 64, old)
    (old / "file").write_text("kept")
    old_device = mounts.loop_device_of(image)
    mounts.create_disk(image, 64, new)
    try:
        assert mounts.loop_device_of(image) not in (None, old_device)
        assert (old / "file").read_text() == "kept"  # the old filesystem, untouched
        assert not (new / "file").exists()  # a new, empty one
    finally:
        mounts.unmount(new)
        mounts.unmount(old)


async def test_a_disk_mounts_on_its_own_device_which_goes_with_the_mount(place: Path) -> None:
    image, point = place / "disk.img", place / "mnt"
    mounts.create_disk(image, 64, point)
    assert mounts.is_mount_point(point)
    device = mounts.loop_device_of(image)
    assert device is not None
    (point / "file").write_text("kept")
    features = subprocess.run(
        ["dumpe2fs", "-h", str(image)], capture_output=True, text=True, check=True
    ).stdout
    assert "has_journal" not in features and "resize_inode" not in features

    # Mounted again while attached: the same device, so the same filesystem instance.
    second = place / "again"
    second.mkdir()
    mounts.mount_disk(image, second)
    assert mounts.loop_device_of(image) == device
    assert (second / "file").read_text() == "kept"

    mounts.unmount(second)
    mounts.unmount(point)
    await wait_until(lambda: detached(image), "the loop device detaches with its last mount")

    # Mounted from scratch: a device again, and the file is there.
    mounts.mount_disk(image, point)
    assert (point / "file").read_text() == "kept"
    mounts.unmount(point)
    await wait_until(lambda: detached(image), "the loop device detaches with its last mount")


async def test_a_disk_that_does_not_mount_leaves_no_device_attached(place: Path) -> None:
    image, point = place / "garbage.img", place / "mnt"
    image.write_bytes(b"not a filesystem\n" * 65536)
    point.mkdir()
    with pytest.raises(SandboxFailed) as failure:
        mounts.mount_disk(image, point)
    assert failure.value.code == "mount_failed"
    assert not mounts.is_mount_point(point)
    assert detached(image)
    assert image.read_bytes() == b"not a filesystem\n" * 65536


async def test_disks_attached_at_once_each_get_their_own_device(place: Path) -> None:
    images = [place / f"disk{n}.img" for n in range(12)]
    for image in images:
        mounts.format_disk(image, 32)

    def attach(image: Path) -> None:
        point = image.with_suffix(".mnt")
        point.mkdir()
        mounts.mount_disk(image, point)
        (point / "name").write_text(image.name)

    with ThreadPoolExecutor(len(images)) as threads:
        list(threads.map(attach, images))
    devices = {mounts.loop_device_of(image) for image in images}
    assert None not in devices and len(devices) == len(images)
    for image in images:
        assert (image.with_suffix(".mnt") / "name").read_text() == image.name
        mounts.unmount(image.with_suffix(".mnt"))
    await wait_until(lambda: all(detached(i) for i in images), "every loop device detaches")
