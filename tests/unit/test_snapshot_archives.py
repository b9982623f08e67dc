"""Snapshots moved between nodes as archives (`SnapshotStore.pack` and `install`): a copy is
the same snapshot on the other side, and a damaged, hostile or misnamed archive installs
nothing."""

from __future__ import annotations

import io
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from corral.core.errors import Conflict, CorralError
from corral.core.models import SnapshotInfo
from corral.core.spec import SandboxSpec
from corral.engine.sealing import KeyRing
from corral.engine.snapshots import SnapshotStore
from corral.images.transfer import file_digest


def store(root: Path, key: Path) -> SnapshotStore:
    made = SnapshotStore(root, KeyRing(path=key, create=True))
    made.load()
    return made


@dataclass
class Packed:
    source: SnapshotStore
    snapshot_id: str
    archive: Path
    digest: str
    target: SnapshotStore  # another node's, empty


@pytest.fixture
def packed(tmp_path: Path) -> Packed:
    """A store with one snapshot (a checkpoint of two files, one in a subdirectory), packed;
    and another node's empty store (the nodes share the at-rest key)."""
    source = store(tmp_path / "a", tmp_path / "key")
    with source.writing() as (snapshot_id, temp):
        (temp / "checkpoint.img").write_bytes(b"memory" * 1000)
        (temp / "pages").mkdir()
        (temp / "pages" / "0").write_bytes(b"\0" * 4096)
        info = SnapshotInfo(snapshot_id, "sb-1", "gvisor", "base", time.time(), None, 0, "s", "k1")
        source.commit(temp, info, SandboxSpec(env={"A": "1"}), b"secret")
    archive = tmp_path / "sn.tar"
    digest = source.pack(snapshot_id, archive)
    return Packed(source, snapshot_id, archive, digest, store(tmp_path / "b", tmp_path / "key"))


def test_a_copy_is_the_same_snapshot_on_the_other_node(tmp_path: Path, packed: Packed) -> None:
    source, snapshot_id, archive, digest, target = unpacked(packed)
    assert digest == file_digest(archive) and digest.startswith("sha256:")
    copied = target.install(snapshot_id, archive, digest)
    original = source.get(snapshot_id)
    assert copied.info == original.info and copied.spec == original.spec
    assert copied.agent_secret == b"secret"
    assert (copied.path / "pages" / "0").read_bytes() == b"\0" * 4096
    assert (copied.path / "checkpoint.img").stat().st_mode & 0o777 == 0o600
    again = store(tmp_path / "b", tmp_path / "key")  # and it is there after a restart
    assert again.get(snapshot_id).info == original.info
    with pytest.raises(Conflict) as twice:
        target.install(snapshot_id, archive, digest)
    assert twice.value.code == "snapshot_exists"


def test_a_damaged_archive_installs_nothing(tmp_path: Path, packed: Packed) -> None:
    _, snapshot_id, archive, digest, target = unpacked(packed)
    data = bytearray(archive.read_bytes())
    data[2000] ^= 0xFF
    archive.write_bytes(bytes(data))
    with pytest.raises(CorralError) as damaged:
        target.install(snapshot_id, archive, digest)
    assert damaged.value.status_code == 400 and damaged.value.code == "digest_mismatch"
    assert "copy it again" in str(damaged.value)
    assert target.all() == [] and list((tmp_path / "b").iterdir()) == []


def unpacked(packed: Packed) -> tuple[SnapshotStore, str, Path, str, SnapshotStore]:
    return packed.source, packed.snapshot_id, packed.archive, packed.digest, packed.target


def _archive(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for member, data in members:
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data) if data else None)
    return file_digest(path)


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("../escaped", tarfile.REGTYPE),
        ("/etc/escaped", tarfile.REGTYPE),
        ("pages/../../escaped", tarfile.REGTYPE),
        ("link", tarfile.SYMTYPE),
        ("hard", tarfile.LNKTYPE),
        ("device", tarfile.CHRTYPE),
    ],
)
def test_a_hostile_archive_installs_nothing_and_writes_nowhere_else(
    tmp_path: Path, name: str, kind: bytes
) -> None:
    member = tarfile.TarInfo(name)
    member.type = kind
    member.linkname = "/etc/passwd"
    archive = tmp_path / "evil.tar"
    digest = _archive(archive, [(member, b"x" if kind == tarfile.REGTYPE else b"")])
    target = store(tmp_path / "b", tmp_path / "key")
    with pytest.raises(CorralError) as refused:
        target.install("sn-3kq9z0m1x7c2v5ne", archive, digest)
    assert refused.value.code == "invalid_archive"
    assert target.all() == [] and list((tmp_path / "b").iterdir()) == []
    assert not (tmp_path / "escaped").exists() and not Path("/etc/escaped").exists()


def test_an_archive_of_another_snapshot_or_none_is_refused(tmp_path: Path, packed: Packed) -> None:
    _, snapshot_id, archive, digest, target = unpacked(packed)
    with pytest.raises(CorralError) as misnamed:
        target.install("sn-3kq9z0m1x7c2v5ne", archive, digest)
    assert misnamed.value.code == "invalid_archive" and snapshot_id in str(misnamed.value)
    empty = tmp_path / "empty.tar"
    with pytest.raises(CorralError) as nothing:
        target.install(snapshot_id, empty, _archive(empty, []))
    assert nothing.value.code == "invalid_archive"
    with pytest.raises(CorralError) as bad_id:
        target.install("../sn", archive, digest)
    assert bad_id.value.status_code == 400
    assert target.all() == []
