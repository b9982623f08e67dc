"""File operations of the guest agent: every path is resolved here, inside the sandbox.

Standard library only, for any Python >= 3.8 (see guest.py). `stream` is the guest's Stream:
`event()`, `send_data()`, `read_input()` and `cancelled` are all that is used.
"""

from __future__ import annotations

import errno
import os
import stat

TYPE_CHECKING = False  # `typing` is for annotations only: 2 ms of every agent's start (aio)
if TYPE_CHECKING:
    from typing import Any, Dict, List

try:
    from corral.agent import protocol as P
except ImportError:  # inside the sandbox the agent directory itself is on sys.path
    import protocol as P  # type: ignore[import-not-found,no-redef]

MAX_LIST_ENTRIES = 100_000


class GuestError(Exception):
    """An error to report to the host as {"code", "message"}."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def os_error(exc: OSError, path: str = "") -> GuestError:
    code = errno.errorcode.get(exc.errno or 0, "EIO")
    where = path or exc.filename or ""
    return GuestError(code, "%s: %s" % (where, exc.strerror) if where else str(exc.strerror))


def check_path(params: Dict[str, Any], key: str = "path") -> str:
    path = params.get(key)
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise GuestError("invalid_path", "%s must be an absolute path without NUL bytes" % key)
    return path


async def fs_read(stream: Any, params: Dict[str, Any]) -> Dict[str, Any]:
    path = check_path(params)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise os_error(exc, path) from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise GuestError("EISDIR", "%s is a directory" % path)
        if not stat.S_ISREG(info.st_mode):
            raise GuestError("invalid_path", "%s is not a regular file" % path)
        os.set_blocking(fd, True)
        await stream.event({"type": "file", "size": info.st_size, "mode": info.st_mode & 0o7777})
        total = 0
        while not stream.cancelled:
            chunk = os.read(fd, P.CHUNK)
            if not chunk:
                break
            total += len(chunk)
            await stream.send_data(P.FILE, chunk)
        return {"bytes": total, "cancelled": stream.cancelled}
    finally:
        os.close(fd)


async def _receive(stream: Any, fd: int) -> int:
    """Write the host's FILE data for `stream` to `fd` until EOF; how many bytes came."""
    total = 0
    while True:
        chunk = await stream.read_input()
        if chunk is None:
            return total
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view) :]
        total += len(chunk)


async def fs_write(stream: Any, params: Dict[str, Any]) -> Dict[str, Any]:
    path = check_path(params)
    mode = params.get("mode")
    append = bool(params.get("append"))
    parent = os.path.dirname(path) or "/"
    if params.get("parents", True):
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise os_error(exc, parent) from None
    if os.path.isdir(path):
        raise GuestError("EISDIR", "%s is a directory" % path)
    # A new file is written beside the target and renamed over it, so a reader never sees
    # half a file and a failed upload leaves the old content in place.
    target = path
    temp = None
    try:
        if append:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        else:
            temp = os.path.join(parent, ".%s.corral-%d" % (os.path.basename(path), id(stream)))
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        raise os_error(exc, path) from None
    try:
        total = await _receive(stream, fd)
        if stream.cancelled:
            raise GuestError("cancelled", "upload to %s was cancelled" % path)
        if temp is not None:
            try:
                old = os.stat(target)
                os.fchmod(fd, old.st_mode & 0o7777)
                os.fchown(fd, old.st_uid, old.st_gid)
            except OSError:
                pass
        if isinstance(mode, int):
            os.fchmod(fd, mode & 0o7777)
        os.close(fd)
        fd = -1
        if temp is not None:
            os.rename(temp, target)
            temp = None
    except OSError as exc:
        raise os_error(exc, path) from None
    finally:
        if fd >= 0:
            os.close(fd)
        if temp is not None:
            try:
                os.unlink(temp)
            except OSError:
                pass
    return {"bytes": total, "path": path}


async def fs_stat(stream: Any, params: Dict[str, Any]) -> Dict[str, Any]:
    path = check_path(params)
    try:
        return describe(path, os.path.basename(path.rstrip("/")) or "/", os.lstat(path))
    except OSError as exc:
        raise os_error(exc, path) from None


async def fs_list(stream: Any, params: Dict[str, Any]) -> Dict[str, Any]:
    path = check_path(params)
    depth = params.get("depth", 1)
    if not isinstance(depth, int) or not 1 <= depth <= 64:
        raise GuestError("invalid_request", "depth must be between 1 and 64")
    entries: List[Dict[str, Any]] = []
    truncated = False
    pending = [(path, 1)]
    try:
        if not stat.S_ISDIR(os.stat(path).st_mode):
            raise GuestError("ENOTDIR", "%s is not a directory" % path)
        while pending and not truncated:
            directory, level = pending.pop()
            try:
                with os.scandir(directory) as it:
                    for entry in sorted(it, key=lambda e: e.name):
                        full = os.path.join(directory, entry.name)
                        info = entry.stat(follow_symlinks=False)
                        entries.append(describe(full, entry.name, info))
                        if len(entries) >= MAX_LIST_ENTRIES:
                            truncated = True
                            break
                        if level < depth and stat.S_ISDIR(info.st_mode):
                            pending.append((full, level + 1))
            except PermissionError:
                if directory == path:
                    raise
    except OSError as exc:
        raise os_error(exc, path) from None
    return {"entries": entries, "truncated": truncated}


async def fs_mkdir(stream: Any, params: Dict[str, Any]) -> Dict[str, Any]:
    path = check_path(params)
    mode = params.get("mode", 0o755)
    try:
        if params.get("parents", True):
            os.makedirs(path, mode=mode, exist_ok=True)
        else:
            os.mkdir(path, mode)
        return describe(path, os.path.basename(path), os.lstat(path))
    except OSError as exc:
        raise os_error(exc, path) from None


async def fs_remove(stream: Any, params: Dict[str, Any]) -> Dict[str, Any]:
    path = check_path(params)
    if path.rstrip("/") == "":
        raise GuestError("invalid_path", "refusing to remove the sandbox's root directory")
    try:
        info = os.lstat(path)
        if stat.S_ISDIR(info.st_mode):
            if params.get("recursive"):
                # Imported here: shutil brings bz2 and lzma (1.7 ms, 0.3 MiB of each agent's start).
                import shutil  # noqa: PLC0415

                shutil.rmtree(path)  # never follows symlinks out of the tree
            else:
                os.rmdir(path)
        else:
            os.unlink(path)
    except OSError as exc:
        raise os_error(exc, path) from None
    return {"removed": path}


async def fs_rename(stream: Any, params: Dict[str, Any]) -> Dict[str, Any]:
    src = check_path(params, "src")
    dst = check_path(params, "dst")
    try:
        if not params.get("overwrite") and os.path.lexists(dst):
            raise GuestError("EEXIST", "%s already exists" % dst)
        os.rename(src, dst)
        return describe(dst, os.path.basename(dst), os.lstat(dst))
    except OSError as exc:
        raise os_error(exc) from None


async def fs_chmod(stream: Any, params: Dict[str, Any]) -> Dict[str, Any]:
    path = check_path(params)
    mode = params.get("mode")
    if not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise GuestError("invalid_request", "mode must be an integer between 0 and 0o7777")
    try:
        os.chmod(path, mode)
        return describe(path, os.path.basename(path), os.lstat(path))
    except OSError as exc:
        raise os_error(exc, path) from None


def describe(path: str, name: str, info: os.stat_result) -> Dict[str, Any]:
    mode = info.st_mode
    if stat.S_ISDIR(mode):
        kind = "dir"
    elif stat.S_ISREG(mode):
        kind = "file"
    elif stat.S_ISLNK(mode):
        kind = "symlink"
    else:
        kind = "other"
    entry = {
        "name": name,
        "path": path,
        "type": kind,
        "size": info.st_size,
        "mode": mode & 0o7777,
        "mtime": info.st_mtime,
        "uid": info.st_uid,
        "gid": info.st_gid,
    }
    if kind == "symlink":
        try:
            entry["target"] = os.readlink(path)
        except OSError:
            entry["target"] = None
    return entry
