"""What a sandbox changed in its filesystem, for runtimes whose writable layer is out of reach.

gVisor keeps a sandbox's writable layer inside the Sentry (its file store is unlinked on the
host), and this runsc has no command to export it. So the changes are found the long way: the
sandbox lists its root (`find -xdev`, through the guest agent), the host lists the image's
read-only root, and whatever differs in type, mode, owner, size or times was written in the
sandbox; whatever the image has and the sandbox lacks was deleted. The sandbox then tars the
changed paths itself, and the deletions become OCI whiteouts, so `oci.unpack_layer` turns the
result into an ordinary layer.

Unchanged files compare equal because the Gofer passes the host's times through exactly. A
file rewritten with the same size and times would be missed; that needs a deliberate
`touch -d` after the write, by the sandbox's own code.
"""

from __future__ import annotations

import os
import posixpath
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

# Not part of a root filesystem's content: kernel views, per-sandbox mounts, scratch space.
PRUNED = ("/proc", "/sys", "/dev", "/tmp", "/run")
LISTING = (
    "find / -xdev \\( "
    + " -o ".join(f"-path {p}" for p in PRUNED)
    + " \\) -prune -o -printf '%y\\t%m\\t%U\\t%G\\t%s\\t%T@\\t%C@\\t%p\\0'; "
    "printf '\\nMOUNTS\\n'; awk '{print $5}' /proc/self/mountinfo"
)
_TYPES = {
    stat.S_IFREG: "f",
    stat.S_IFDIR: "d",
    stat.S_IFLNK: "l",
    stat.S_IFIFO: "p",
    stat.S_IFSOCK: "s",
    stat.S_IFCHR: "c",
    stat.S_IFBLK: "b",
}
TIME_SLACK = 1e-5  # seconds: both sides print times as decimals


@dataclass(frozen=True)
class Entry:
    kind: str  # find's %y: f, d, l, p, s, c, b
    mode: int
    uid: int
    gid: int
    size: int
    mtime: float
    ctime: float

    def same_as(self, other: Entry) -> bool:
        if (self.kind, self.uid, self.gid) != (other.kind, other.uid, other.gid):
            return False
        if self.kind != "l" and self.mode != other.mode:  # a symlink's mode means nothing
            return False
        if self.kind != "d" and self.size != other.size:  # directory sizes vary by fs
            return False
        return (
            abs(self.mtime - other.mtime) <= TIME_SLACK
            and abs(self.ctime - other.ctime) <= TIME_SLACK
        )


def parse_listing(output: bytes) -> tuple[dict[str, Entry], set[str]]:
    """The entries and mount points the sandbox printed with `LISTING`."""
    body, _, mounts = output.partition(b"\nMOUNTS\n")
    entries = {}
    for record in body.split(b"\0"):
        record = record.lstrip(b"\n")
        if not record:
            continue
        kind, mode, uid, gid, size, mtime, ctime, path = record.decode(
            "utf-8", "surrogateescape"
        ).split("\t", 7)
        entries[path] = Entry(
            kind, int(mode, 8), int(uid), int(gid), int(size), float(mtime), float(ctime)
        )
    return entries, {m for m in mounts.decode(errors="replace").split() if m != "/"}


def host_listing(root: Path, uid_base: int, uid_range: int) -> dict[str, Entry]:
    """The image's root as the sandbox would list it (host ids shifted back into the image's)."""

    def inside(value: int) -> int:
        return value - uid_base if uid_base <= value < uid_base + uid_range else value

    entries = {}
    for directory, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            full = os.path.join(directory, name)
            info = os.lstat(full)
            path = "/" + os.path.relpath(full, root)
            entries[path] = Entry(
                _TYPES.get(stat.S_IFMT(info.st_mode), "?"),
                stat.S_IMODE(info.st_mode),
                inside(info.st_uid),
                inside(info.st_gid),
                info.st_size,
                info.st_mtime_ns / 1e9,
                info.st_ctime_ns / 1e9,
            )
    return entries


def changes(
    guest: dict[str, Entry], lower: dict[str, Entry], mounts: set[str]
) -> tuple[list[str], list[str]]:
    """(paths written in the sandbox, in listing order; topmost paths it deleted)."""
    skipped = (*PRUNED, *mounts)

    def skip(path: str) -> bool:
        return any(path == s or path.startswith(s + "/") for s in skipped)

    changed = [
        path
        for path, entry in guest.items()
        if path != "/" and not skip(path) and not (path in lower and lower[path].same_as(entry))
    ]
    gone = {path for path in lower if path not in guest and not skip(path)}
    topmost = sorted(p for p in gone if posixpath.dirname(p) not in gone)
    return changed, topmost


def add_whiteouts(archive: Path, deleted: list[str]) -> None:
    """Append an OCI whiteout (`.wh.<name>`) for each deleted path to a tar archive."""
    with tarfile.open(archive, "a") as tar:
        for path in deleted:
            parent, name = posixpath.split(path.lstrip("/"))
            info = tarfile.TarInfo(posixpath.join(parent, ".wh." + name))
            tar.addfile(info)
