"""The listing diff that finds a gvisor sandbox's changes: parsing, comparing, whiteouts."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

from corral.images import fsdiff
from corral.images.fsdiff import Entry


def record(path: str, kind: str, mode: str, *, uid: int, size: int, mtime: float) -> bytes:
    return f"{kind}\t{mode}\t{uid}\t{uid}\t{size}\t{mtime}\t{mtime}\t{path}\0".encode()


def test_a_listing_parses_with_odd_names_and_mounts() -> None:
    output = (
        record("/", "d", "755", uid=0, size=4096, mtime=1.5)
        + record("/home/a\tb\nc", "f", "644", uid=1000, size=3, mtime=2.25)
        + b"\nMOUNTS\n/\n/etc/hosts\n/data\n"
    )
    entries, mounts = fsdiff.parse_listing(output)
    assert entries["/home/a\tb\nc"] == Entry("f", 0o644, 1000, 1000, 3, 2.25, 2.25)
    assert mounts == {"/etc/hosts", "/data"}


def test_changes_are_what_differs_and_deletions_are_topmost() -> None:
    same = Entry("f", 0o644, 0, 0, 5, 10.0, 10.0)
    lower = {
        "/etc": Entry("d", 0o755, 0, 0, 4096, 1.0, 1.0),
        "/etc/kept": same,
        "/etc/edited": same,
        "/etc/gone": same,
        "/old": Entry("d", 0o755, 0, 0, 4096, 1.0, 1.0),
        "/old/inner": same,
        "/etc/hosts": same,
        "/tmp/x": same,
    }
    guest = {
        "/etc": Entry("d", 0o755, 0, 0, 12, 1.0, 1.0),  # a directory's size does not count
        "/etc/kept": same,
        "/etc/edited": Entry("f", 0o644, 0, 0, 5, 10.0, 11.0),  # ctime moved
        "/etc/new": same,
        "/etc/hosts": Entry("f", 0o644, 0, 0, 99, 50.0, 50.0),  # a bind mount: not content
    }
    changed, deleted = fsdiff.changes(guest, lower, {"/etc/hosts"})
    assert changed == ["/etc/edited", "/etc/new"]
    assert deleted == ["/etc/gone", "/old"]  # /old/inner goes with /old; /tmp is never content


def test_the_host_side_sees_image_ids_and_whiteouts_are_appended(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "dir").mkdir(parents=True)
    (root / "dir" / "file").write_text("x")
    os.chown(root / "dir" / "file", 100_000 + 7, 100_000 + 7)
    entries = fsdiff.host_listing(root, 100_000, 65536)
    assert entries["/dir/file"].uid == 7 and entries["/dir"].kind == "d"
    archive = tmp_path / "layer.tar"
    with tarfile.open(archive, "w"):
        pass
    fsdiff.add_whiteouts(archive, ["/etc/gone", "/old"])
    with tarfile.open(archive) as tar:
        assert tar.getnames() == ["etc/.wh.gone", ".wh.old"]
