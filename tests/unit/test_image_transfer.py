"""Built images copied between nodes (`corral.images.transfer`): a copy is the same image,
overlayfs' markers included, and a damaged, hostile or misnamed archive installs nothing."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from corral.core.errors import CorralError
from corral.images import transfer
from corral.images.layers import LayerStore, Manifest, image_id

KEY = hashlib.sha256(b"a layer").hexdigest()
IMAGE = image_id(KEY)
BASES = {"debian"}


def _store(root: Path) -> LayerStore:
    store = LayerStore(root)
    store.prepare()
    return store


def _layer(store: LayerStore) -> Path:
    """A layer with what overlayfs' format and images hold: owners and set-uid bits, links,
    a whiteout, an opaque directory, symlinks that point out of it (content, not paths)."""
    root = store.layer(KEY)
    (root / "usr" / "bin").mkdir(parents=True)
    tool = root / "usr" / "bin" / "tool"
    tool.write_bytes(b"#!/bin/sh\necho tool\n")
    os.chown(tool, 1000, 1001)
    tool.chmod(0o4755)
    os.link(tool, root / "usr" / "bin" / "tool-again")
    (root / "etc").mkdir()
    (root / "etc" / "shadow-link").symlink_to("/etc/shadow")
    (root / "lib").symlink_to("usr/lib")
    os.mknod(root / "etc" / "removed", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    (root / "opt").mkdir()
    os.setxattr(root / "opt", "trusted.overlay.opaque", b"y")
    (root / "opt" / "kept.txt").write_text("kept")
    return root


def _packed(tmp_path: Path) -> tuple[Path, str]:
    source = _store(tmp_path / "a")
    _layer(source)
    source.save(Manifest(id=IMAGE, key=KEY, base="debian", layers=(KEY,), env={"A": "1"}))
    archive = tmp_path / "image.tar"
    return archive, transfer.pack(source, IMAGE, archive)


def test_a_copied_image_is_the_same_image_with_overlayfs_markers(tmp_path: Path) -> None:
    archive, digest = _packed(tmp_path)
    assert digest == transfer.file_digest(archive)
    target = _store(tmp_path / "b")
    assert not transfer.can_run(target, IMAGE)
    manifest = transfer.install(target, IMAGE, archive, digest, base_ok=BASES)
    assert (manifest.id, manifest.layers, dict(manifest.env)) == (IMAGE, (KEY,), {"A": "1"})
    assert transfer.can_run(target, IMAGE) and target.manifest(IMAGE) == manifest
    root = target.layer(KEY)
    tool = (root / "usr" / "bin" / "tool").stat()
    assert (tool.st_uid, tool.st_gid, stat.S_IMODE(tool.st_mode)) == (1000, 1001, 0o4755)
    assert tool.st_nlink == 2 and (root / "usr" / "bin" / "tool-again").stat().st_ino == tool.st_ino
    assert os.readlink(root / "etc" / "shadow-link") == "/etc/shadow"
    assert os.readlink(root / "lib") == "usr/lib"
    removed = (root / "etc" / "removed").lstat()
    assert stat.S_ISCHR(removed.st_mode) and removed.st_rdev == 0
    assert os.getxattr(root / "opt", "trusted.overlay.opaque") == b"y"
    assert (root / "opt" / "kept.txt").read_text() == "kept"
    # Installing it again keeps what is there.
    again = transfer.install(target, IMAGE, archive, digest, base_ok=BASES)
    assert again == manifest


def test_a_damaged_archive_installs_nothing(tmp_path: Path) -> None:
    archive, digest = _packed(tmp_path)
    data = bytearray(archive.read_bytes())
    data[2000] ^= 0xFF
    archive.write_bytes(bytes(data))
    target = _store(tmp_path / "b")
    with pytest.raises(CorralError) as refused:
        transfer.install(target, IMAGE, archive, digest, base_ok=BASES)
    assert refused.value.code == "digest_mismatch"
    assert not transfer.can_run(target, IMAGE) and not target.has_layer(KEY)


def _archive(path: Path, manifest: dict[str, object], members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in {transfer.MANIFEST: json.dumps(manifest).encode(), **members}.items():
            entry = tarfile.TarInfo(name)
            entry.size = len(data)
            tar.addfile(entry, io.BytesIO(data))
    return transfer.file_digest(path)


def _layer_tar(*entries: tuple[str, str]) -> bytes:
    """A layer archive of (name, symlink target or "" for a file saying 'x')."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, target in entries:
            entry = tarfile.TarInfo(name)
            if target:
                entry.type, entry.linkname = tarfile.SYMTYPE, target
                tar.addfile(entry)
            else:
                entry.size = 1
                tar.addfile(entry, io.BytesIO(b"x"))
    return out.getvalue()


GOOD = {"id": IMAGE, "key": KEY, "base": "debian", "layers": [KEY], "env": {}}


@pytest.mark.parametrize(
    ("manifest", "members", "says"),
    [
        ({**GOOD, "id": image_id("0" * 64)}, {}, "not valid"),  # another image's
        ({**GOOD, "layers": ["../../etc"]}, {}, "not valid"),
        ({**GOOD, "base": "host"}, {}, "not valid"),  # a base this node does not offer
        ({**GOOD, "env": {"A": 1}}, {}, "not valid"),
        (GOOD, {"../escape": b"x"}, "not one of its layers"),
        (GOOD, {f"layers/{'1' * 64}.tar": b""}, "not one of its layers"),
        (GOOD, {}, "lacks its layer"),
        (GOOD, {f"layers/{KEY}.tar": _layer_tar(("out", "/tmp"), ("out/evil", ""))}, "unpacked"),
        (GOOD, {f"layers/{KEY}.tar": _layer_tar(("../evil", ""))}, "unpacked"),
    ],
)
def test_a_hostile_or_misnamed_archive_installs_nothing(
    tmp_path: Path, manifest: dict[str, object], members: dict[str, bytes], says: str
) -> None:
    archive = tmp_path / "image.tar"
    digest = _archive(archive, manifest, members)
    target = _store(tmp_path / "b")
    with pytest.raises(CorralError, match=says) as refused:
        transfer.install(target, IMAGE, archive, digest, base_ok=BASES)
    assert refused.value.code == "invalid_archive"
    assert not transfer.can_run(target, IMAGE) and not target.has_layer(KEY)
    assert not (tmp_path / "evil").exists() and not Path("/tmp/evil").exists()
    assert not any(target.layers_dir.iterdir())  # no half-unpacked layer left


def test_an_image_that_is_not_here_whole_is_not_packed(tmp_path: Path) -> None:
    source = _store(tmp_path / "a")
    source.save(Manifest(id=IMAGE, key=KEY, base="debian", layers=(KEY,)))  # no layer
    with pytest.raises(CorralError) as missing:
        transfer.pack(source, IMAGE, tmp_path / "image.tar")
    assert missing.value.code == "image_not_found"


@pytest.mark.parametrize("bad", ["../../etc/passwd", "im-", "sn-3kq9z0m1x7c2v5ne", "im-3KQ9"])
def test_an_image_id_that_is_not_one_is_refused_before_any_path_is_made(
    tmp_path: Path, bad: str
) -> None:
    store = _store(tmp_path / "a")
    for attempt in (
        lambda: transfer.can_run(store, bad),
        lambda: transfer.pack(store, bad, tmp_path / "image.tar"),
        lambda: transfer.install(store, bad, tmp_path / "image.tar", "sha256:0", base_ok=BASES),
    ):
        with pytest.raises(CorralError) as refused:
            attempt()
        assert refused.value.code == "invalid_id"
