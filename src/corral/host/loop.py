"""Loop devices, attached with ioctls instead of `mount -o loop`.

`mount -o loop` is a process of its own that looks for a free device and sets it up: with the
mount, 4.4 ms of every sandbox's create on the development machine. Here the engine asks
/dev/loop-control for a free device and configures it with one `LOOP_CONFIGURE` (Linux 5.8):
0.6 ms with the mount(2) (docs/performance.md).

The device is attached with autoclear, as `mount -o loop` does: it detaches by itself once the
last user (the filesystem mounted from it) lets go, so nothing here has to detach it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from corral.core.errors import SandboxFailed

LOOP_CONTROL = "/dev/loop-control"
LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LO_FLAGS_AUTOCLEAR = 4
LOOP_MAJOR = 7
# Another process may take the free device between asking for it and configuring it.
ATTEMPTS = 16


class _LoopInfo64(ctypes.Structure):
    _fields_ = (
        ("lo_device", ctypes.c_uint64),
        ("lo_inode", ctypes.c_uint64),
        ("lo_rdevice", ctypes.c_uint64),
        ("lo_offset", ctypes.c_uint64),
        ("lo_sizelimit", ctypes.c_uint64),
        ("lo_number", ctypes.c_uint32),
        ("lo_encrypt_type", ctypes.c_uint32),
        ("lo_encrypt_key_size", ctypes.c_uint32),
        ("lo_flags", ctypes.c_uint32),
        ("lo_file_name", ctypes.c_char * 64),
        ("lo_crypt_name", ctypes.c_char * 64),
        ("lo_encrypt_key", ctypes.c_char * 32),
        ("lo_init", ctypes.c_uint64 * 2),
    )


class _LoopConfig(ctypes.Structure):
    _fields_ = (
        ("fd", ctypes.c_uint32),
        ("block_size", ctypes.c_uint32),
        ("info", _LoopInfo64),
        ("reserved", ctypes.c_uint64 * 8),
    )


@contextmanager
def attached(image: Path) -> Iterator[str]:
    """`image` attached to a free loop device, whose path this yields, while the block runs.

    Mount the device inside the block: the mount keeps it attached after the block; without
    one, the device is detached again as the block ends.
    """
    device = _attach(image)
    try:
        yield os.readlink(f"/proc/self/fd/{device}")
    finally:
        os.close(device)


def _attach(image: Path) -> int:
    """Attach `image` to a free loop device (autoclear); an open descriptor of the device."""
    backing = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        control = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(ATTEMPTS):
                device = _open_device(fcntl.ioctl(control, LOOP_CTL_GET_FREE))
                config = _LoopConfig(fd=backing)
                config.info.lo_flags = LO_FLAGS_AUTOCLEAR
                config.info.lo_file_name = os.fsencode(image)[-63:]
                try:
                    fcntl.ioctl(device, LOOP_CONFIGURE, config)
                except OSError as exc:
                    os.close(device)
                    if exc.errno == errno.EBUSY:
                        continue  # taken meanwhile: ask again
                    raise
                return device
        finally:
            os.close(control)
    except OSError as exc:
        raise SandboxFailed(
            f"cannot attach {image.name} to a loop device: {exc.strerror}", code="mount_failed"
        ) from exc
    finally:
        os.close(backing)
    raise SandboxFailed(
        f"cannot attach {image.name} to a loop device: every free one was taken meanwhile",
        code="mount_failed",
    )


def _open_device(number: int) -> int:
    """Open /dev/loopN, making its node where /dev does not (a /dev that is not devtmpfs)."""
    path = f"/dev/loop{number}"
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        os.mknod(path, stat.S_IFBLK | 0o660, os.makedev(LOOP_MAJOR, number))
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
