"""Built images on disk: content-addressed layers and the manifests that stack them.

Under the data directory's ``images/``:

- ``layers/<key>/``: one layer, the files a build step added or changed, in overlayfs's own
  format (a deleted file is a 0:0 character device, a replaced directory carries the
  ``trusted.overlay.opaque`` xattr), owned as in the image (root is uid 0). `key` is the sha256
  of what produced it: the parent's key, the step, the content of the files it copied. Layers
  are stacked read-only by overlayfs under every sandbox of every image that uses them, never
  copied.
- ``built/<im-id>.json``: a manifest: the base, the layers bottom first, env and workdir.
  Every prefix of a recipe is itself an image (that is the cache); the service decides which
  ones users see.
- ``blobs/sha256/<hex>``: uploaded content (copied files, archives) until the next prune.
- ``locks/<key>``: the file lock held while layer `key` is built.

Everything appears atomically: a layer is written under a temporary name and renamed, a
manifest is written to a temporary file and renamed, so a crash never leaves a half-written
layer that looks complete. Builds of one key are done once, under a file lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import AsyncIterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from corral.core.errors import InvalidRequest, PayloadTooLarge, SandboxFailed

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # as corral.core.ids
_KEY = re.compile(r"[0-9a-f]{64}")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
NOBODY = 65534


def chain_key(parent: str, step: Mapping[str, Any]) -> str:
    """The key of the image made by applying `step` (canonical JSON) to image `parent`."""
    canonical = json.dumps(step, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{parent}\n{canonical}".encode()).hexdigest()


def image_id(key: str) -> str:
    """``im-`` and 80 bits of `key` in Crockford base32: ids are content addresses too."""
    number = int(key[:20], 16)
    return "im-" + "".join(_ALPHABET[(number >> (5 * i)) & 31] for i in reversed(range(16)))


@dataclass(frozen=True)
class Manifest:
    """A built image: a base root filesystem with layers on top, and its defaults."""

    id: str
    key: str
    base: str  # "debian", "host", or "" when the layers are the whole root
    layers: tuple[str, ...]  # layer keys, bottom first
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str | None = None
    steps: tuple[str, ...] = ()  # one line per step, for people
    created_at: float = 0.0
    size_bytes: int = 0  # of its own layers, shared ones included

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "key": self.key,
            "base": self.base,
            "layers": list(self.layers),
            "env": dict(self.env),
            "workdir": self.workdir,
            "steps": list(self.steps),
            "created_at": self.created_at,
            "size_bytes": self.size_bytes,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        return cls(
            id=data["id"],
            key=data["key"],
            base=data["base"],
            layers=tuple(data["layers"]),
            env=MappingProxyType(dict(data["env"])),
            workdir=data.get("workdir"),
            steps=tuple(data.get("steps", ())),
            created_at=float(data.get("created_at", 0.0)),
            size_bytes=int(data.get("size_bytes", 0)),
        )


class LayerStore:
    """The built images, layers and blobs of one data directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.layers_dir = root / "layers"
        self.manifests_dir = root / "built"
        self.blobs_dir = root / "blobs" / "sha256"
        self.locks_dir = root / "locks"

    def prepare(self) -> None:
        """Make the directories; sweep what an interrupted build or upload left."""
        for directory in (self.layers_dir, self.manifests_dir, self.blobs_dir, self.locks_dir):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Root only: a layer may hold set-user-id files a build made, which no host user may
        # reach. Sandboxes never traverse it; root stacks the layers for them (idmapped).
        self.layers_dir.chmod(0o700)
        for leftover in self.layers_dir.glob(".*"):  # a layer being written or unpacked
            key = _KEY.search(leftover.name)
            if leftover.is_dir() and key is not None:
                with contextlib.suppress(OSError), self.lock(key.group(), wait=False):
                    shutil.rmtree(leftover, ignore_errors=True)
        for leftover in self.blobs_dir.glob(".tmp-*"):
            if time.time() - leftover.stat().st_mtime > 3600:
                leftover.unlink(missing_ok=True)

    # -- manifests --------------------------------------------------------------------------

    def manifest(self, image: str) -> Manifest | None:
        """The built image `image` (an im- id), or None."""
        try:
            data = json.loads((self.manifests_dir / f"{image}.json").read_text())
        except (OSError, ValueError):
            return None
        return Manifest.from_dict(data)

    def save(self, manifest: Manifest) -> None:
        _write_atomic(self.manifests_dir / f"{manifest.id}.json", json.dumps(manifest.to_dict()))

    def manifests(self) -> list[Manifest]:
        found = [self.manifest(path.stem) for path in self.manifests_dir.glob("im-*.json")]
        return [m for m in found if m is not None]

    # -- layers -----------------------------------------------------------------------------

    def layer(self, key: str) -> Path:
        return self.layers_dir / key

    def has_layer(self, key: str) -> bool:
        return self.layer(key).is_dir()

    @contextlib.contextmanager
    def new_layer(self, key: str) -> Iterator[Path]:
        """A directory to fill; it becomes layer `key` if the block succeeds, else vanishes."""
        temp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=self.layers_dir))
        try:
            temp.chmod(0o755)
            yield temp
            temp.rename(self.layer(key))
        finally:
            if temp.exists():
                shutil.rmtree(temp, ignore_errors=True)

    @contextlib.contextmanager
    def lock(self, key: str, *, wait: bool = True) -> Iterator[None]:
        """Hold the build lock of `key` (across processes); BlockingIOError if not `wait`."""
        path = self.locks_dir / key
        with path.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def layer_size(self, key: str) -> int:
        return _tree_size(self.layer(key))

    # -- blobs ------------------------------------------------------------------------------

    def blob(self, digest: str) -> Path:
        if not isinstance(digest, str) or not _DIGEST.match(digest):
            raise InvalidRequest(f"{digest!r} is not a digest like sha256:<64 hex digits>")
        return self.blobs_dir / digest.removeprefix("sha256:")

    def has_blob(self, digest: str) -> bool:
        return self.blob(digest).is_file()

    async def add_blob(self, digest: str, chunks: AsyncIterable[bytes], limit: int) -> int:
        """Store content that must hash to `digest` (checked) and be at most `limit` bytes."""
        final = self.blob(digest)
        fd, temp = tempfile.mkstemp(prefix=".tmp-", dir=self.blobs_dir)
        hasher = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLarge(
                            f"uploaded content is limited to {limit // 2**20} MiB on this server"
                        )
                    hasher.update(chunk)
                    out.write(chunk)
            if "sha256:" + hasher.hexdigest() != digest:
                raise InvalidRequest(
                    f"the content's sha256 is {hasher.hexdigest()}, not {digest} as sent",
                    code="digest_mismatch",
                )
            os.replace(temp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        return size

    # -- disk -------------------------------------------------------------------------------

    def usage(self) -> dict[str, int]:
        """Bytes on disk: every layer, and blobs waiting for a build."""
        return {
            "layers_bytes": sum(_tree_size(p) for p in self.layers_dir.iterdir() if p.is_dir()),
            "blobs_bytes": sum(p.stat().st_size for p in self.blobs_dir.iterdir() if p.is_file()),
        }

    def prune(self, keep: set[str], in_use: set[str]) -> dict[str, int]:
        """Remove manifests not in `keep` (ids) and every layer neither they nor `in_use`
        (layer keys of live sandboxes) need, and every blob; returns what was freed."""
        needed = set(in_use)
        removed_images = 0
        for manifest in self.manifests():
            if manifest.id in keep:
                needed.update(manifest.layers)
            else:
                (self.manifests_dir / f"{manifest.id}.json").unlink(missing_ok=True)
                removed_images += 1
        freed = removed_layers = 0
        for path in self.layers_dir.iterdir():
            if path.is_dir() and not path.name.startswith(".") and path.name not in needed:
                try:
                    with self.lock(path.name, wait=False):
                        size = _tree_size(path)
                        shutil.rmtree(path)
                except BlockingIOError:  # being built right now
                    continue
                freed += size
                removed_layers += 1
        for blob in self.blobs_dir.iterdir():
            if not blob.name.startswith("."):
                freed += blob.stat().st_size
                blob.unlink(missing_ok=True)
        for lock in self.locks_dir.iterdir():
            if not (self.layers_dir / lock.name).exists():
                lock.unlink(missing_ok=True)
        return {
            "removed_images": removed_images,
            "removed_layers": removed_layers,
            "freed_bytes": freed,
        }


def export_changes(upper: Path, dest: Path, uid_base: int, uid_range: int) -> None:
    """Copy an overlay's upper directory into `dest` as a layer, owned as in the image.

    Files in a sandbox's writable layer belong to its host uids (`uid_base` + the uid inside);
    a layer stores the uids inside. Whiteouts, opaque directories, hard links, sparse files and
    special bits survive: `cp -a` copies, then ownership is shifted and modes restored (a chown
    clears set-user-id bits). Ids outside the sandbox's range become nobody.
    """
    done = subprocess.run(
        ["cp", "-a", "--no-target-directory", f"{upper}/.", str(dest)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SandboxFailed(f"copying the build's changes failed: {done.stderr.strip()}")

    def shift(value: int) -> int:
        if uid_base <= value < uid_base + uid_range:
            return value - uid_base
        return value if value == 0 else NOBODY

    seen: set[int] = set()  # inodes: a hard link must not be shifted twice
    for directory, dirs, files in os.walk(dest):
        links = [name for name in dirs if os.path.islink(os.path.join(directory, name))]
        for path in (directory, *(os.path.join(directory, n) for n in (*files, *links))):
            info = os.lstat(path)
            if info.st_ino in seen:
                continue
            seen.add(info.st_ino)
            os.lchown(path, shift(info.st_uid), shift(info.st_gid))
            if not stat.S_ISLNK(info.st_mode):
                os.chmod(path, stat.S_IMODE(info.st_mode))
    os.chown(dest, 0, 0)
    os.chmod(dest, 0o755)  # noqa: S103 - a layer root is world-traversable like any "/"


def _tree_size(path: Path) -> int:
    total = 0
    seen: set[tuple[int, int]] = set()
    for directory, _dirs, files in os.walk(path):
        for name in files:
            info = os.lstat(os.path.join(directory, name))
            if (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                total += info.st_blocks * 512
    return total


def _write_atomic(path: Path, text: str) -> None:
    temp = path.with_name(f".tmp-{path.name}")
    temp.write_text(text)
    os.replace(temp, path)
