"""Manifests, indexes, configs and blobs: the formats an OCI or Docker image is made of,
parsed and checked the same way whether the image came from an archive or a registry."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

StatusLine = Callable[[str], None]  # told each line of progress, as it happens
_Json = dict[str, Any]

_MIB = 1024 * 1024
_CHUNK = _MIB
# Manifests are capped at 4 MiB by the distribution spec; configs with a long history are larger.
_JSON_LIMIT = 16 * _MIB
_MAX_NESTING = 4  # index -> index -> manifest is the deepest anyone builds
_MAX_LINK_HOPS = 8
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# docker save names files after their content: "<hex>.json", "blobs/sha256/<hex>", "<hex>.tar".
_NAMED_BY_DIGEST = re.compile(r"(?:^|/)([0-9a-f]{64})(?:\.json|\.tar)?\Z")


_ARCHITECTURES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


@dataclass(frozen=True)
class OciConfig:
    """The settings of an image's config that a sandbox started from the image inherits."""

    env: dict[str, str]
    workdir: str | None
    user: str | None
    cmd: tuple[str, ...] | None


@dataclass(frozen=True)
class OciImage:
    """An image's layer blobs on local disk, bottom layer first, with their digests and config.

    Example:
        >>> image = read_archive(Path("debian.tar"), Path("/var/tmp/im"))  # doctest: +SKIP
        >>> for i, blob in enumerate(image.layers):  # doctest: +SKIP
        ...     unpack_layer(blob, Path(f"/var/tmp/im/layer-{i}"))
    """

    layers: tuple[Path, ...]
    digests: tuple[str, ...]
    config: OciConfig


class _Malformed(Exception):
    """Input that breaks the image formats; the public functions add what it was and what to do."""


# -- manifests, indexes and configs (shared by archives and registries) ----------------------------


def _load_json(data: bytes, what: str) -> object:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise _Malformed(f"{what} is not valid JSON ({exc})") from exc


def _parse_json(data: bytes, what: str) -> _Json:
    doc = _load_json(data, what)
    if not isinstance(doc, dict):
        raise _Malformed(f"{what} is not a JSON object")
    return doc


def _descriptors(doc: _Json, key: str) -> list[_Json]:
    items = doc.get(key)
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise _Malformed(f"the {key!r} of a manifest is not a list of descriptors")
    return items


def _digest_of(descriptor: _Json) -> str:
    """The descriptor's digest, refused unless it is sha256, the one algorithm we verify."""
    digest = descriptor.get("digest")
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise _Malformed(f"unsupported or malformed digest {digest!r} (Corral verifies sha256)")
    return digest


def _size_of(descriptor: _Json) -> int:
    size = descriptor.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _Malformed(f"descriptor {descriptor.get('digest')} has no valid size")
    return size


def machine_platform() -> tuple[str, str]:
    """This machine's (os, architecture) in the words OCI indexes use, e.g. ("linux", "amd64")."""
    machine = platform.machine().lower()
    return "linux", _ARCHITECTURES.get(machine, machine)


def _pick_manifest(index: _Json) -> _Json:
    """The descriptor of this machine's image in an index.

    An entry for another platform is never taken as a fallback: its binaries would fail in the
    sandbox with "exec format error", far from the cause. Entries without a platform (what
    `docker save` and single-image layouts write) are taken when nothing matches exactly.
    """
    # BuildKit adds attestation manifests (platform unknown/unknown): they are not images.
    entries = [
        entry
        for entry in _descriptors(index, "manifests")
        if (entry.get("annotations") or {}).get("vnd.docker.reference.type")
        != "attestation-manifest"
    ]
    wanted = machine_platform()
    for entry in entries:
        found = entry.get("platform")
        if isinstance(found, dict) and (found.get("os"), found.get("architecture")) == wanted:
            return entry
    for entry in entries:
        if not entry.get("platform"):
            return entry
    offered = sorted(
        f"{found.get('os')}/{found.get('architecture')}"
        for found in (entry.get("platform") for entry in entries)
        if isinstance(found, dict)
    )
    raise _Malformed(
        f"no manifest for {'/'.join(wanted)} (the index offers {', '.join(offered) or 'none'})"
    )


def _resolve(doc: _Json, fetch: Callable[[_Json], _Json]) -> _Json:
    """Follow image indexes down to one image manifest; `fetch` reads a descriptor's document."""
    for _ in range(_MAX_NESTING):
        if "manifests" not in doc:
            return _check_manifest(doc)
        doc = fetch(_pick_manifest(doc))
    raise _Malformed(f"image indexes nested more than {_MAX_NESTING} deep")


def _check_manifest(doc: _Json) -> _Json:
    if doc.get("schemaVersion") == 1:
        raise _Malformed(
            "Docker schema 1 manifests are not supported: rebuild or re-push the image"
        )
    if not isinstance(doc.get("config"), dict) or "layers" not in doc:
        raise _Malformed("the manifest has no config or no layers")
    return doc


def _strings(value: object, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _Malformed(f"{what} in the image config is not a list of strings")
    return tuple(value)


def _optional_text(value: object, what: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise _Malformed(f"{what} in the image config is not a string")
    return value or None


def _parse_config(doc: _Json) -> OciConfig:
    settings = doc.get("config") or {}
    if not isinstance(settings, dict):
        raise _Malformed("the image config's 'config' is not an object")
    env = {
        key: value
        for key, _, value in (item.partition("=") for item in _strings(settings.get("Env"), "Env"))
    }
    cmd = _strings(settings.get("Entrypoint"), "Entrypoint") + _strings(settings.get("Cmd"), "Cmd")
    return OciConfig(
        env=env,
        workdir=_optional_text(settings.get("WorkingDir"), "WorkingDir"),
        user=_optional_text(settings.get("User"), "User"),
        cmd=cmd or None,
    )


# -- blobs in the work directory -------------------------------------------------------------------


def _store_blob(chunks: Iterable[bytes], workdir: Path, digest: str, size: int | None) -> Path:
    """Write a blob into `workdir` while hashing it; keep it only if digest and size match.

    The blob goes to a hidden partial file first so that a name `sha256-<hex>` always holds
    verified content, whatever interrupts the copy.
    """
    hex_digest = digest.removeprefix("sha256:")
    final = workdir / f"sha256-{hex_digest}"
    if final.exists():  # an image may use one layer twice
        return final
    partial = workdir / f".partial-sha256-{hex_digest}"
    hasher = hashlib.sha256()
    written = 0
    with partial.open("wb") as out:
        for chunk in chunks:
            hasher.update(chunk)
            out.write(chunk)
            written += len(chunk)
            if size is not None and written > size:
                break
    got = f"sha256:{hasher.hexdigest()}"
    if got != digest or (size is not None and written != size):
        partial.unlink()
        raise _Malformed(
            f"blob {digest} is corrupt or truncated: got {written} bytes with digest {got}"
        )
    partial.rename(final)
    return final


@contextlib.contextmanager
def _removing_new_entries(workdir: Path) -> Iterator[None]:
    """On failure, remove what was written into `workdir` so no half-made image remains."""
    before = set(os.listdir(workdir))
    try:
        yield
    except BaseException:
        for name in set(os.listdir(workdir)) - before:
            (workdir / name).unlink()  # only blob files are ever written there
        raise


# -- archives on disk ------------------------------------------------------------------------------
