"""Layer blobs unpacked into directories overlayfs can stack, safely: every path in a layer is
resolved one component at a time, never through a symlink, never out of the layer."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from corral.core.errors import Conflict, InvalidRequest
from corral.images.oci.archive import _ARCHIVE_READ_ERRORS, _open_tar
from corral.images.oci.manifest import _CHUNK, _Malformed

_OPAQUE_XATTR = "trusted.overlay.opaque"
_WHITEOUT_PREFIX = ".wh."
_OPAQUE_MARKER = ".wh..wh..opq"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Errors that a hostile or broken layer provokes (a name through a symlink or a file, a name too
# long); anything else (no space, not root) is about this machine and propagates as it is.
_LAYER_ERRNOS = (errno.ELOOP, errno.ENOTDIR, errno.ENAMETOOLONG, errno.EMLINK)

log = logging.getLogger(__name__)
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GiB = 1 << 30
MAX_LAYER_BYTES = 16 * _GiB  # what one layer may unpack to, by the sizes its members declare
MAX_IMAGE_BYTES = 32 * _GiB  # what all the layers of one image may, together
MAX_MEMBERS = 1_000_000  # entries in one layer
_MEMBER_OVERHEAD = 512  # counted for every entry, whatever it holds


class Budget:
    """What is left to unpack: bytes (every member counts its declared size and a header's
    worth) and entries. One per layer, and one an image's layers share."""

    def __init__(
        self, max_bytes: int | None = None, max_members: int | None = None, what: str = "a layer"
    ) -> None:
        self.limit = MAX_LAYER_BYTES if max_bytes is None else max_bytes
        self.max_members = MAX_MEMBERS if max_members is None else max_members
        self.bytes_left, self.members_left, self.what = self.limit, self.max_members, what

    def spend(self, member: tarfile.TarInfo) -> None:
        self.bytes_left -= max(member.size, 0) + _MEMBER_OVERHEAD
        self.members_left -= 1
        if self.bytes_left < 0:
            raise _Malformed(f"{self.what} unpacks to more than {self.limit / _GiB:g} GiB")
        if self.members_left < 0:
            raise _Malformed(f"{self.what} has more than {self.max_members:,} entries")


def unpack_layer(blob: Path, dest: Path, image: Budget | None = None) -> None:
    """Apply one layer blob (a tar, possibly gzip'd) into the new directory `dest`.

    The result is an overlayfs lower layer: whiteouts become 0:0 character devices, opaque
    markers the ``trusted.overlay.opaque`` xattr; files keep their numeric owner, mode
    (setuid/setgid/sticky included) and mtime. Device nodes are skipped (sandboxes mount nodev),
    and so are xattrs from the archive: a layer must never choose overlay or security xattrs.
    Directories a layer does not list get mode 0755 and root ownership.

    The layer is unpacked into a hidden sibling and renamed to `dest` at the end, so `dest` is
    either complete or absent. It may unpack to at most `MAX_LAYER_BYTES` in `MAX_MEMBERS`
    entries, and spends `image`, the budget of the image it belongs to; sparse members and
    extended headers over `MAX_HEADER_BYTES` are refused (streamed: nothing is held whole).

    Raises:
        Conflict: `dest` already exists.
        InvalidRequest: code ``invalid_oci_archive`` for a malformed or hostile layer (a name
            with "..", a path through a symlink, a hardlink out of the layer), or code
            ``unsupported_layer_compression`` for zstd.

    Example:
        >>> unpack_layer(image.layers[0], Path("/var/tmp/im/layer-0"))  # doctest: +SKIP
    """
    if os.path.lexists(dest):
        raise Conflict(f"{dest} already exists: unpack each layer into a new directory")
    with blob.open("rb") as source:
        if source.read(4) == _ZSTD_MAGIC:
            raise InvalidRequest(
                f"layer {blob.name} is zstd-compressed, which Corral cannot unpack yet: "
                "push the image with gzip layers (e.g. `docker buildx build --output "
                "type=image,compression=gzip,force-compression=true`)",
                code="unsupported_layer_compression",
            )
        source.seek(0)
        temporary = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            _unpack_into(source, temporary, blob, image)
            temporary.rename(dest)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise


def _unpack_into(source: IO[bytes], root: Path, blob: Path, image: Budget | None) -> None:
    unpacker = _Unpacker(root)
    budgets = [Budget(), *([image] if image is not None else [])]
    try:
        # Stream mode reads the layer once, front to back, never holding it in memory.
        with _open_tar(source, "r|*") as tar:
            for member in tar:
                tar.members.clear()  # type: ignore[attr-defined]  # tarfile keeps every header
                for budget in budgets:
                    budget.spend(member)
                with _member_errors(member.name):
                    unpacker.apply(member, tar)
        with _member_errors("(directory metadata)"):
            unpacker.finish()
    except _ARCHIVE_READ_ERRORS as exc:
        raise InvalidRequest(
            f"layer {blob.name} cannot be unpacked: {exc}. The image is corrupt or hostile: "
            "rebuild it or pull it again",
            code="invalid_oci_archive",
        ) from exc
    finally:
        unpacker.close()
    if unpacker.skipped_devices:
        log.debug("skipped %d device nodes in layer %s", unpacker.skipped_devices, blob)


@contextlib.contextmanager
def _member_errors(name: str) -> Iterator[None]:
    """Turn the OS errors a hostile or broken member provokes into `_Malformed`."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _LAYER_ERRNOS:
            raise
        raise _Malformed(f"member {name!r}: {exc.strerror}") from exc
    except (ValueError, OverflowError) as exc:  # NUL in a name, an absurd mtime
        raise _Malformed(f"member {name!r}: {exc}") from exc


def _layer_path(name: str) -> tuple[str, ...]:
    """A member name as path components inside the layer; absolute names are taken as relative,
    and ".." is refused outright since no honest layer needs it."""
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise _Malformed(f"member {name!r} climbs out of the layer with '..'")
    return parts


class _Unpacker:
    """Writes tar members under one root directory, through directory descriptors only.

    Each member's parent is reached by opening one component at a time with O_NOFOLLOW from the
    root's descriptor, so a symlink an earlier member planted (``a -> /etc``) can never redirect
    a later write (``a/passwd``) out of the layer: the walk fails instead.
    """

    def __init__(self, root: Path) -> None:
        self._root = os.open(root, _DIR_FLAGS)
        self._dirs: dict[tuple[str, ...], tarfile.TarInfo] = {}
        self.skipped_devices = 0

    def close(self) -> None:
        os.close(self._root)

    def apply(self, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        """Write one member, or translate it into overlayfs' markers, or skip it."""
        path = _layer_path(member.name)
        if not path:
            if not member.isdir():
                raise _Malformed(f"member {member.name!r} names the layer's root but no directory")
            self._dirs[()] = member
            return
        if member.ischr() or member.isblk():
            self.skipped_devices += 1
            return
        if member.sparse is not None:  # PAX sparse (GNU.sparse.* keys)
            raise _Malformed(f"member {member.name!r} is a sparse file, which layers may not hold")
        parent, name = path[:-1], path[-1]
        with self._open_dir(parent, create=True) as fd:
            if name.startswith(_WHITEOUT_PREFIX):
                self._whiteout(fd, path)
                return
            self._make_room(fd, path, keep_dir=member.isdir())
            if member.isdir():
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o700, dir_fd=fd)
                # Applied at the end: writing children would change its mtime, and a mode
                # without write permission would stop them being written.
                self._dirs[path] = member
            elif member.isreg():
                self._write_file(fd, name, member, tar)
            elif member.issym():
                os.symlink(member.linkname, name, dir_fd=fd)
                self._set_owner_and_time(fd, name, member)
            elif member.islnk():
                self._hardlink(fd, name, member)
            elif member.isfifo():
                os.mkfifo(name, 0o600, dir_fd=fd)
                self._set_owner_and_time(fd, name, member, mode=True)
            else:
                raise _Malformed(f"member {member.name!r} has unsupported type {member.type!r}")

    def _whiteout(self, fd: int, path: tuple[str, ...]) -> None:
        """Translate the layer format's whiteout files into overlayfs' own markers."""
        name = path[-1]
        if name == _OPAQUE_MARKER:
            os.setxattr(fd, _OPAQUE_XATTR, b"y")
            return
        hidden = name.removeprefix(_WHITEOUT_PREFIX)
        if hidden.startswith(_WHITEOUT_PREFIX):
            return  # aufs bookkeeping (.wh..wh.plnk): no meaning for overlayfs
        if hidden in ("", ".", ".."):
            raise _Malformed(f"whiteout {'/'.join(path)!r} hides nothing")
        self._make_room(fd, (*path[:-1], hidden), keep_dir=False)
        os.mknod(hidden, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=fd)

    def _write_file(
        self, fd: int, name: str, member: tarfile.TarInfo, tar: tarfile.TarFile
    ) -> None:
        source = tar.extractfile(member)
        assert source is not None  # regular members always have data
        with source, open(os.open(name, _FILE_FLAGS, 0o600, dir_fd=fd), "wb") as out:
            shutil.copyfileobj(source, out, _CHUNK)
            out.flush()
            # chown clears setuid/setgid bits, so the mode comes after it.
            os.fchown(out.fileno(), member.uid, member.gid)
            os.fchmod(out.fileno(), stat.S_IMODE(member.mode))
            os.utime(out.fileno(), ns=(_mtime_ns(member), _mtime_ns(member)))

    def _hardlink(self, fd: int, name: str, member: tarfile.TarInfo) -> None:
        """Link to a file an earlier member of this same layer wrote, and to nothing else."""
        refused = _Malformed(
            f"hardlink {member.name!r} points to {member.linkname!r}, "
            "which is not a file earlier in this layer"
        )
        target = _layer_path(member.linkname)
        if not target:
            raise refused
        try:
            with self._open_dir(target[:-1], create=False) as target_fd:
                found = os.stat(target[-1], dir_fd=target_fd, follow_symlinks=False)
                if stat.S_ISDIR(found.st_mode):
                    raise IsADirectoryError
                # Without follow_symlinks a link to a symlink links the symlink itself.
                os.link(
                    target[-1], name, src_dir_fd=target_fd, dst_dir_fd=fd, follow_symlinks=False
                )
        except (_Malformed, FileNotFoundError, IsADirectoryError):
            raise refused from None

    def _set_owner_and_time(
        self, fd: int, name: str, member: tarfile.TarInfo, *, mode: bool = False
    ) -> None:
        os.chown(name, member.uid, member.gid, dir_fd=fd, follow_symlinks=False)
        if mode:  # never for symlinks, whose mode Linux ignores and chmod would follow
            os.chmod(name, stat.S_IMODE(member.mode), dir_fd=fd)
        ns = _mtime_ns(member)
        os.utime(name, ns=(ns, ns), dir_fd=fd, follow_symlinks=False)

    def _make_room(self, fd: int, path: tuple[str, ...], *, keep_dir: bool) -> None:
        """Remove what an earlier member left at `path`: in a tar, the last entry wins."""
        name = path[-1]
        try:
            found = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(found.st_mode):
            os.unlink(name, dir_fd=fd)
        elif not keep_dir:
            shutil.rmtree(name, dir_fd=fd)  # works on descriptors, never follows symlinks
            self._dirs = {p: m for p, m in self._dirs.items() if p[: len(path)] != path}

    @contextlib.contextmanager
    def _open_dir(self, path: tuple[str, ...], *, create: bool) -> Iterator[int]:
        """A descriptor for directory `path` under the root, reached without following symlinks."""
        fd = os.dup(self._root)
        try:
            for depth, part in enumerate(path, 1):
                child = self._open_child(fd, part, create, path[:depth])
                os.close(fd)
                fd = child
            yield fd
        finally:
            os.close(fd)

    @staticmethod
    def _open_child(fd: int, part: str, create: bool, path: tuple[str, ...]) -> int:
        try:
            return os.open(part, _DIR_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                raise _Malformed(f"{'/'.join(path)} is not in this layer") from None
            # Layers normally list every directory; one they omit gets Docker's default.
            os.mkdir(part, 0o755, dir_fd=fd)
            return os.open(part, _DIR_FLAGS, dir_fd=fd)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            raise _Malformed(
                f"{'/'.join(path)} is a symlink or a file, and a later member writes through it"
            ) from exc

    def finish(self) -> None:
        """Give directories their own owner, mode and mtime, now that nothing more is written."""
        if () not in self._dirs:
            os.fchmod(self._root, 0o755)
        for path, member in self._dirs.items():
            with self._open_dir(path, create=False) as fd:
                os.fchown(fd, member.uid, member.gid)
                os.fchmod(fd, stat.S_IMODE(member.mode))
                os.utime(fd, ns=(_mtime_ns(member), _mtime_ns(member)))


def _mtime_ns(member: tarfile.TarInfo) -> int:
    return int(member.mtime * 1_000_000_000)
