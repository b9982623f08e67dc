"""Memory snapshots on disk: a gvisor checkpoint and what is needed to start sandboxes from it.

``<data>/snapshots/<sn-id>/`` holds runsc's checkpoint image and ``snapshot.json`` (the source
sandbox's spec, so a new sandbox gets the same image, runtime and limits). A snapshot is written
under ``.tmp-<sn-id>`` and renamed when complete, so a crash mid-write leaves a temporary
directory (swept at the next start), never a snapshot that looks usable and is not.

Snapshots move between the nodes of a cluster as a tar archive and its SHA-256 (`pack`,
`install`): the receiving node checks the digest before it unpacks anything, and installs the
snapshot the same way, whole or not at all. Nodes share the at-rest key, so what is sealed
on one opens on the other.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from corral.core.errors import Conflict, InvalidRequest, NotFound
from corral.core.ids import check_id, new_id
from corral.core.models import SnapshotInfo
from corral.core.spec import SandboxSpec
from corral.engine.sealing import KeyRing, SealError, open_secret, open_spec, seal_secret, seal_spec
from corral.images.transfer import file_digest

log = logging.getLogger("corral.engine")

META_NAME = "snapshot.json"
CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Snapshot:
    """A complete snapshot on disk: its description, the spec to start from, the image."""

    info: SnapshotInfo
    spec: SandboxSpec
    path: Path  # runsc's checkpoint image directory
    # The secret of the agent in its memory (see `corral.agent.protocol`); None for snapshots
    # taken before agents proved themselves.
    agent_secret: bytes | None = None


class SnapshotStore:
    """The snapshots of one data directory, kept in memory after `load`."""

    def __init__(self, root: Path, keys: KeyRing) -> None:
        self.root = root
        self.keys = keys
        self._snapshots: dict[str, Snapshot] = {}

    def load(self) -> None:
        """Read every complete snapshot; remove what an interrupted write left."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for path in self.root.iterdir():
            if path.name.startswith(".tmp-"):
                shutil.rmtree(path, ignore_errors=True)
                continue
            try:
                meta = json.loads((path / META_NAME).read_text())
                info = SnapshotInfo(**meta["info"])
                spec = open_spec(self.keys, meta["spec"])
                secret = open_secret(self.keys, meta.get("agent_secret"))
            except SealError as exc:
                log.warning("snapshot %s left alone: %s", path.name, exc)
                continue
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not ours, or damaged by hand: left alone
            self._snapshots[info.id] = Snapshot(info, spec, path, secret)

    @contextmanager
    def writing(self) -> Iterator[tuple[str, Path]]:
        """A new id and a directory to write its checkpoint into; `commit` makes it real."""
        snapshot_id = new_id("sn")
        temp = self.root / f".tmp-{snapshot_id}"
        temp.mkdir(mode=0o700)
        try:
            yield snapshot_id, temp
        finally:
            if temp.exists():
                shutil.rmtree(temp, ignore_errors=True)

    def commit(
        self, temp: Path, info: SnapshotInfo, spec: SandboxSpec, agent_secret: bytes | None
    ) -> Snapshot:
        """Describe the checkpoint in `temp` and make it visible, atomically."""
        size = sum(f.stat().st_size for f in temp.rglob("*") if f.is_file())
        info = SnapshotInfo(**{**info.to_dict(), "size_bytes": size})
        meta = temp / META_NAME
        record = {
            "info": info.to_dict(),
            "spec": seal_spec(self.keys, spec),
            "agent_secret": seal_secret(self.keys, agent_secret),
        }
        # Root's alone, like the directory: it holds the agent's secret.
        fd = os.open(meta, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(record))
        with meta.open("rb") as handle:
            os.fsync(handle.fileno())
        final = self.root / info.id
        temp.rename(final)
        snapshot = Snapshot(info, spec, final, agent_secret)
        self._snapshots[info.id] = snapshot
        return snapshot

    def get(self, snapshot_id: str) -> Snapshot:
        found = self._snapshots.get(snapshot_id)
        if found is None:
            raise NotFound(f"no snapshot {snapshot_id}", code="snapshot_not_found")
        return found

    def all(self) -> list[Snapshot]:
        return sorted(self._snapshots.values(), key=lambda s: s.info.created_at)

    def delete(self, snapshot_id: str) -> None:
        snapshot = self.get(snapshot_id)
        del self._snapshots[snapshot_id]
        # Renamed first, so a crash mid-delete leaves a temporary directory, not half a snapshot.
        doomed = self.root / f".tmp-{snapshot_id}"
        snapshot.path.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def take_out(self, snapshot_id: str, to: Path) -> Snapshot:
        """Move snapshot `snapshot_id`'s directory to `to` (on the same file system); it is
        no longer a snapshot. For a sandbox that moved here (`corral.engine.moving`)."""
        snapshot = self.get(snapshot_id)
        del self._snapshots[snapshot_id]
        snapshot.path.rename(to)
        return snapshot

    def expired(self, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        return [
            s.info.id
            for s in self._snapshots.values()
            if s.info.expires_at is not None and s.info.expires_at <= now
        ]

    def pack(self, snapshot_id: str, archive: Path) -> str:
        """Write snapshot `snapshot_id` as a tar archive to `archive`; its SHA-256."""
        snapshot = self.get(snapshot_id)
        with tarfile.open(archive, "w") as tar:
            for path in sorted(snapshot.path.rglob("*")):
                tar.add(path, arcname=str(path.relative_to(snapshot.path)), recursive=False)
        return file_digest(archive)

    def install(self, snapshot_id: str, archive: Path, digest: str) -> Snapshot:
        """Install snapshot `snapshot_id` from an archive that `pack` wrote on another node,
        if its SHA-256 is `digest`; nothing is installed otherwise."""
        check_id(snapshot_id, "sn")
        if snapshot_id in self._snapshots:
            raise Conflict(f"snapshot {snapshot_id} is here already", code="snapshot_exists")
        if file_digest(archive) != digest:
            raise InvalidRequest(
                f"the archive of snapshot {snapshot_id} does not match its digest {digest}: "
                "it was damaged on the way; copy it again",
                code="digest_mismatch",
            )
        with self.writing() as (_, temp):
            try:
                _unpack(archive, temp)
                meta = json.loads((temp / META_NAME).read_text())
                info = SnapshotInfo(**meta["info"])
                spec = open_spec(self.keys, meta["spec"])
                secret = open_secret(self.keys, meta.get("agent_secret"))
            except (OSError, ValueError, KeyError, TypeError, tarfile.TarError, SealError) as exc:
                raise InvalidRequest(
                    f"the archive of snapshot {snapshot_id} is not a snapshot: {exc}",
                    code="invalid_archive",
                ) from None
            if info.id != snapshot_id:
                raise InvalidRequest(
                    f"the archive holds snapshot {info.id}, not {snapshot_id}",
                    code="invalid_archive",
                )
            final = self.root / snapshot_id
            temp.rename(final)
        snapshot = Snapshot(info, spec, final, secret)
        self._snapshots[snapshot_id] = snapshot
        return snapshot


def _unpack(archive: Path, into: Path) -> None:
    """Unpack `pack`'s archive into the empty directory `into`: plain files and directories
    only, each inside `into` (ValueError for anything else)."""
    with tarfile.open(archive) as tar:
        for member in tar:
            target = into / member.name
            inside = not member.name.startswith("/") and ".." not in Path(member.name).parts
            if not inside or not (member.isfile() or member.isdir()):
                raise ValueError(f"{member.name!r} is not a plain file inside the snapshot")
            if member.isdir():
                target.mkdir(mode=0o700, parents=True, exist_ok=True)
                continue
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            with source, os.fdopen(os.open(target, flags, 0o600), "wb") as out:
                shutil.copyfileobj(source, out, CHUNK)
