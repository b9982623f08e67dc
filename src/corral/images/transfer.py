"""Built images copied between a cluster's nodes, for a sandbox or snapshot that moves to a
node that lacks its image (`corral.server.cluster`).

The node that has the image packs it as one tar archive: its manifest (``manifest.json``) and
each of its layers as a layer archive in the OCI format (``layers/<key>.tar``, overlayfs'
whiteouts and opaque directories written as ``.wh.`` entries). The node that needs it checks
the archive's SHA-256 against the one the holder named before it reads anything, then unpacks
each layer it lacks with the unpacker of pulled images (`corral.images.oci.unpack`: every path
resolved one component at a time, never through a symlink, devices and xattrs dropped, sizes
bounded), and writes the manifest last: the image is there whole or not at all. Built-in base
images (``debian``, …) are not copied: each node makes its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import stat
import tarfile
import tempfile
from pathlib import Path
from typing import IO, Any

from corral.core.errors import CorralError, ImageNotFound, InvalidRequest
from corral.core.ids import check_id
from corral.images.layers import LayerStore, Manifest, image_id
from corral.images.oci.unpack import MAX_IMAGE_BYTES, Budget, unpack_layer

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 20
_LAYER_MEMBER = re.compile(r"layers/([0-9a-f]{64})\.tar")
_KEY = re.compile(r"[0-9a-f]{64}")
_OPAQUE_XATTR = "trusted.overlay.opaque"


def can_run(store: LayerStore, image: str) -> bool:
    """Whether built image `image` is here whole (its manifest and every layer)."""
    manifest = store.manifest(check_id(image, "im"))
    return manifest is not None and all(store.has_layer(key) for key in manifest.layers)


def pack(store: LayerStore, image: str, archive: Path) -> str:
    """Write built image `image` to `archive`; return the archive's SHA-256."""
    manifest = store.manifest(check_id(image, "im"))
    if manifest is None or not can_run(store, image):
        raise ImageNotFound(f"no built image {image!r} on this node")
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as outer:
        _add_bytes(outer, MANIFEST, json.dumps(manifest.to_dict()).encode())
        for key in manifest.layers:
            with tempfile.TemporaryFile(dir=archive.parent) as layer:
                with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    _pack_layer(store.layer(key), tar)
                entry = tarfile.TarInfo(f"layers/{key}.tar")
                entry.size = layer.tell()
                layer.seek(0)
                outer.addfile(entry, layer)
    return file_digest(archive)


def install(
    store: LayerStore, image: str, archive: Path, digest: str, *, base_ok: set[str]
) -> Manifest:
    """Install built image `image` from an archive `pack` wrote on another node, if its
    SHA-256 is `digest`. `base_ok`: the base images this node can make. Layers this node has
    are kept as they are."""
    check_id(image, "im")
    if file_digest(archive) != digest:
        raise InvalidRequest(
            f"the archive of image {image} does not match its digest {digest}: it was damaged "
            "on the way; copy it again",
            code="digest_mismatch",
        )
    image_budget = Budget(MAX_IMAGE_BYTES, what="the image")
    try:
        with tarfile.open(archive, "r:") as outer:
            manifest = _manifest(outer, image, base_ok)
            for member in outer:
                if member.name == MANIFEST:
                    continue
                found = _LAYER_MEMBER.fullmatch(member.name)
                key = found.group(1) if found else ""
                if not member.isreg() or key not in manifest.layers:
                    raise InvalidRequest(
                        f"the archive of image {image} holds {member.name!r}, which is not one "
                        "of its layers",
                        code="invalid_archive",
                    )
                source = outer.extractfile(member)
                assert source is not None
                _install_layer(store, key, source, image_budget, archive.parent)
    except tarfile.TarError as exc:
        raise InvalidRequest(
            f"the archive of image {image} cannot be read: {exc}", code="invalid_archive"
        ) from None
    missing = [key for key in manifest.layers if not store.has_layer(key)]
    if missing:
        raise InvalidRequest(
            f"the archive of image {image} lacks its layer {missing[0]}", code="invalid_archive"
        )
    store.save(manifest)
    return manifest


def _manifest(outer: tarfile.TarFile, image: str, base_ok: set[str]) -> Manifest:
    """The archive's manifest (its first member), checked to be image `image`'s."""
    first = outer.next()
    if first is None or first.name != MANIFEST or not first.isreg():
        raise InvalidRequest(
            f"the archive of image {image} does not start with its manifest",
            code="invalid_archive",
        )
    if first.size > MAX_MANIFEST_BYTES:
        raise InvalidRequest(f"the manifest of image {image} is too big", code="invalid_archive")
    source = outer.extractfile(first)
    assert source is not None
    try:
        data: Any = json.loads(source.read())
        manifest = Manifest.from_dict(data)
        if not (
            isinstance(manifest.key, str) and _KEY.fullmatch(manifest.key)
            and manifest.id == image == image_id(manifest.key)
            and all(isinstance(k, str) and _KEY.fullmatch(k) for k in manifest.layers)
            and (manifest.base == "" or manifest.base in base_ok)
            and all(isinstance(v, str) for kv in manifest.env.items() for v in kv)
            and (manifest.workdir is None or isinstance(manifest.workdir, str))
        ):  # fmt: skip
            raise ValueError("it does not describe this image")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InvalidRequest(
            f"the manifest of image {image} is not valid: {exc}", code="invalid_archive"
        ) from None
    return manifest


def _install_layer(
    store: LayerStore,
    key: str,
    source: IO[bytes],
    budget: Budget,
    temp_dir: Path,
) -> None:
    with store.lock(key):
        if store.has_layer(key):
            return  # built or copied here before: the same key is the same layer
        with tempfile.NamedTemporaryFile(dir=temp_dir, suffix=".layer.tar") as blob:
            while chunk := source.read(1 << 20):
                blob.write(chunk)
            blob.flush()
            try:
                unpack_layer(Path(blob.name), store.layer(key), budget)
            except CorralError as exc:
                raise InvalidRequest(
                    f"layer {key} of the archive cannot be unpacked: {exc.message}",
                    code="invalid_archive",
                ) from None


def _pack_layer(root: Path, tar: tarfile.TarFile) -> None:
    """Layer directory `root` (overlayfs' format) as an OCI layer archive."""
    for directory, dirs, files in os.walk(root):
        dirs.sort()
        here = Path(directory)
        relative = here.relative_to(root)
        if relative != Path("."):
            tar.add(here, arcname=str(relative), recursive=False)
        with contextlib.suppress(OSError):
            if os.getxattr(here, _OPAQUE_XATTR, follow_symlinks=False) == b"y":
                _add_bytes(tar, str(relative / ".wh..wh..opq"), b"")
        for name in sorted(files):
            path = here / name
            mode = path.lstat()
            if stat.S_ISCHR(mode.st_mode) and mode.st_rdev == 0:  # a whiteout
                _add_bytes(tar, str(relative / f".wh.{name}"), b"")
            else:
                tar.add(path, arcname=str(relative / name), recursive=False)
        for name in dirs:  # a symlink to a directory is listed here, and not walked
            if (here / name).is_symlink():
                tar.add(here / name, arcname=str(relative / name), recursive=False)
        dirs[:] = [name for name in dirs if not (here / name).is_symlink()]


def file_digest(path: Path) -> str:
    """`sha256:<hex>` of the file at `path`."""
    with path.open("rb") as handle:
        return "sha256:" + hashlib.file_digest(handle, "sha256").hexdigest()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    entry = tarfile.TarInfo(os.path.normpath(name))
    entry.size = len(data)
    entry.mode = 0o644
    tar.addfile(entry, io.BytesIO(data))
