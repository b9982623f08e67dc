"""OCI and Docker images turned into layers that Corral stacks with overlayfs.

An image arrives as an archive on disk (`docker save`, or an OCI image layout) or from a registry
(HTTP API v2). Either way the result is an `OciImage`: its layer blobs, verified against their
sha256 digests and stored in a work directory, and the few settings of its config a sandbox
needs. `unpack_layer` then turns each blob into a directory that overlayfs uses as a lower layer.

Everything read here is untrusted: archives, manifests, configs and layers come from whoever
built the image. Nothing is extracted by a name the archive chooses except inside a layer, where
every path is resolved one component at a time without following symlinks.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import httpx

from corral.errors import Conflict, ImageNotFound, InvalidRequest, ServiceUnavailable

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
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
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

_MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
_INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
_ARCHITECTURES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}

_DOCKER_HUB = "registry-1.docker.io"
_DOCKER_HUB_NAMES = ("docker.io", "index.docker.io", _DOCKER_HUB)
_LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
# Connect fails fast on a down registry; read bounds each wait for bytes, not a whole layer.
_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
_REPOSITORY_PART = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"\w[\w.-]{0,127}")
_REGISTRY_HOST = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\])(?::[0-9]+)?")


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

_ARCHIVE_READ_ERRORS = (_Malformed, tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


def read_archive(path: Path, workdir: Path) -> OciImage:
    """The image in a `docker save` or OCI image-layout tarball (optionally gzip-compressed).

    The layer blobs it uses are copied into `workdir` (an existing, empty directory), each
    verified against the sha256 the archive names for it. An index listing several platforms
    yields this machine's image.

    Raises:
        InvalidRequest: code ``invalid_oci_archive`` for anything malformed, truncated, missing
            or failing its digest; `workdir` is then left as it was.

    Example:
        >>> image = read_archive(Path("python.tar.gz"), Path("/var/tmp/im-1"))  # doctest: +SKIP
        >>> image.config.cmd  # doctest: +SKIP
        ('python3',)
    """
    try:
        source = path.open("rb")
    except OSError as exc:
        raise InvalidRequest(
            f"cannot read image archive {path}: {exc.strerror}; check the path",
            code="invalid_oci_archive",
        ) from exc
    with source, _removing_new_entries(workdir):
        try:
            with _open_tar(source, "r:*") as tar:
                return _Archive(tar, workdir).image()
        except _ARCHIVE_READ_ERRORS as exc:
            raise InvalidRequest(
                f"{path} is not a valid image archive: {exc}. Export the image again with "
                "`docker save IMAGE -o FILE` or `skopeo copy docker://IMAGE oci-archive:FILE`",
                code="invalid_oci_archive",
            ) from exc


def _open_tar(source: IO[bytes], mode: Literal["r:*", "r|*"]) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=source, mode=mode)
    except tarfile.ReadError as exc:  # its message lists every compression tried
        raise _Malformed("it is not a tar file, plain or compressed") from exc


class _Archive:
    """The members of one image archive, looked up by normalised name, never written by name."""

    def __init__(self, tar: tarfile.TarFile, workdir: Path) -> None:
        self._tar = tar
        self._workdir = workdir
        self._members = {_archive_name(member.name): member for member in tar.getmembers()}

    def image(self) -> OciImage:
        if "index.json" in self._members:  # OCI layout, also written by Docker 25 and later
            return self._layout_image()
        if "manifest.json" in self._members:
            return self._docker_save_image()
        raise _Malformed("it has neither index.json (OCI layout) nor manifest.json (docker save)")

    def _layout_image(self) -> OciImage:
        index = _parse_json(self._read("index.json"), "index.json")
        manifest = _resolve(index, self._json_blob)
        config = _parse_config(self._json_blob(manifest["config"]))
        descriptors = _descriptors(manifest, "layers")
        digests = tuple(_digest_of(layer) for layer in descriptors)
        sizes = [_size_of(layer) for layer in descriptors]
        names = [_blob_name(digest) for digest in digests]
        return OciImage(self._copy_all(names, digests, sizes), digests, config)

    def _docker_save_image(self) -> OciImage:
        # One image per archive: `docker save a b` lists several and the first one is taken.
        entries = _load_json(self._read("manifest.json"), "manifest.json")
        if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict):
            raise _Malformed("manifest.json lists no image")
        entry = entries[0]
        config_name, layer_names = entry.get("Config"), entry.get("Layers")
        if not isinstance(config_name, str):
            raise _Malformed("manifest.json names no config")
        config_bytes = self._read(config_name)
        named = _named_digest(config_name)
        if named and f"sha256:{hashlib.sha256(config_bytes).hexdigest()}" != named:
            raise _Malformed(f"config {config_name} does not match its digest")
        config_doc = _parse_json(config_bytes, config_name)
        # The layers of `docker save` are uncompressed, so their digests are the config's diff_ids.
        diff_ids = _strings((config_doc.get("rootfs") or {}).get("diff_ids"), "rootfs.diff_ids")
        names = _strings(layer_names, "Layers of manifest.json")
        if len(names) != len(diff_ids):
            raise _Malformed(f"manifest.json lists {len(names)} layers, the config {len(diff_ids)}")
        digests = tuple(
            _digest_of({"digest": _named_digest(name) or diff_id})
            for name, diff_id in zip(names, diff_ids, strict=True)
        )
        layers = self._copy_all(names, digests, [None] * len(names))
        return OciImage(layers, digests, _parse_config(config_doc))

    def _json_blob(self, descriptor: _Json) -> _Json:
        digest = _digest_of(descriptor)
        data = self._read(_blob_name(digest))
        if f"sha256:{hashlib.sha256(data).hexdigest()}" != digest:
            raise _Malformed(f"blob {digest} does not match its digest")
        return _parse_json(data, f"blob {digest}")

    def _copy_all(
        self, names: Sequence[str], digests: Sequence[str], sizes: Sequence[int | None]
    ) -> tuple[Path, ...]:
        """Copy blobs out in the order they lie in the archive, and return them in list order.

        A gzip'd archive cannot seek backwards without decompressing again from its start.
        """
        blobs = list(zip(names, digests, sizes, strict=True))
        order = sorted(range(len(blobs)), key=lambda i: self._file(names[i]).offset_data)
        copied = {i: self._copy(*blobs[i]) for i in order}
        return tuple(copied[i] for i in range(len(blobs)))

    def _copy(self, name: str, digest: str, size: int | None) -> Path:
        member = self._file(name)
        if size is not None and member.size != size:
            raise _Malformed(f"{name} has {member.size} bytes, its descriptor says {size}")
        source = self._tar.extractfile(member)
        assert source is not None  # _file returns regular files only
        with source:
            return _store_blob(iter(lambda: source.read(_CHUNK), b""), self._workdir, digest, size)

    def _read(self, name: str) -> bytes:
        member = self._file(name)
        if member.size > _JSON_LIMIT:
            raise _Malformed(f"{name} is larger than {_JSON_LIMIT // _MIB} MiB")
        source = self._tar.extractfile(member)
        assert source is not None
        with source:
            return source.read()

    def _file(self, name: str) -> tarfile.TarInfo:
        """The regular file member called `name`, following links inside the archive only.

        `docker save` stores a layer used twice as a symlink to its first copy.
        """
        wanted = _archive_name(name)
        for _ in range(_MAX_LINK_HOPS):
            member = self._members.get(wanted)
            if member is None:
                raise _Malformed(f"it has no member {name!r} (missing blob)")
            if member.isreg():
                return member
            if member.issym():
                wanted = _archive_name(f"{os.path.dirname(wanted)}/{member.linkname}")
            elif member.islnk():
                wanted = _archive_name(member.linkname)
            else:
                raise _Malformed(f"member {name!r} is not a file")
        raise _Malformed(f"member {name!r} is a chain of more than {_MAX_LINK_HOPS} links")


def _archive_name(name: str) -> str:
    return os.path.normpath("/" + name).lstrip("/")


def _blob_name(digest: str) -> str:
    return "blobs/" + digest.replace(":", "/", 1)


def _named_digest(name: str) -> str | None:
    found = _NAMED_BY_DIGEST.search(name)
    return f"sha256:{found.group(1)}" if found else None


# -- registries ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Reference:
    """A parsed image reference: registry host, repository, and a tag or a digest."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def name(self) -> str:
        """What the manifest is fetched by: the digest when given, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def base_url(self) -> str:
        return f"{_scheme(self.registry)}://{self.registry}/v2/{self.repository}/"


def _parse_reference(reference: str) -> _Reference:
    """Split a reference the way Docker does: the first part is a registry only if it has a
    dot, a colon or is localhost; otherwise the image is on Docker Hub (``library/`` for
    single names)."""
    rest, _, digest = reference.partition("@")
    first, slash, remainder = rest.partition("/")
    if slash and (any(c in first for c in ".:[") or first == "localhost"):
        registry, rest = first, remainder
    else:
        registry = "docker.io"
    name, tag = rest, None
    if ":" in rest.rpartition("/")[2]:
        name, _, tag = rest.rpartition(":")
    if registry in _DOCKER_HUB_NAMES:
        registry = _DOCKER_HUB
        name = name if "/" in name else f"library/{name}"
    valid = (
        _REGISTRY_HOST.fullmatch(registry)
        and all(_REPOSITORY_PART.fullmatch(part) for part in name.split("/"))
        and (tag is None or _TAG.fullmatch(tag))
        and (not digest or _DIGEST.fullmatch(digest))
    )
    if not valid:
        raise InvalidRequest(
            f"invalid image reference {reference!r}: write it as [registry/]name[:tag][@sha256:…],"
            " e.g. docker.io/library/debian:bookworm",
            code="invalid_image_reference",
        )
    return _Reference(registry, name, tag or (None if digest else "latest"), digest or None)


def _scheme(registry: str) -> str:
    """Plain http for loopback and registries the operator lists in CORRAL_INSECURE_REGISTRIES."""
    host = (
        registry[1:].partition("]")[0] if registry.startswith("[") else registry.partition(":")[0]
    )
    insecure = {h.strip() for h in os.environ.get("CORRAL_INSECURE_REGISTRIES", "").split(",")}
    return "http" if host in _LOCAL_HOSTS or {host, registry} & insecure else "https"


def pull(reference: str, workdir: Path, *, progress: Progress | None = None) -> OciImage:
    """Pull an image from a registry (HTTP API v2, anonymous) into `workdir`.

    Layers are streamed to disk and verified against their sha256 digests; an index yields this
    machine's platform.

    Raises:
        InvalidRequest: code ``invalid_image_reference`` for a malformed reference,
            ``invalid_oci_image`` for a manifest, config or blob that breaks the format.
        ImageNotFound: the registry has no such image or tag (or keeps it private).
        ServiceUnavailable: code ``registry_unreachable`` when the registry cannot be reached,
            times out or fails; retry later.

    Example:
        >>> image = pull("debian:bookworm", Path("/var/tmp/im-2"), progress=print)  # doctest: +SKIP
        pulling layer 1/1 sha256:4f4fb700ef54… 47.5 MiB
    """
    ref = _parse_reference(reference)
    say = progress or (lambda _line: None)
    with (
        _removing_new_entries(workdir),
        _registry_errors(reference, ref),
        httpx.Client(timeout=_TIMEOUT, follow_redirects=True) as client,
    ):
        registry = _Registry(reference, ref, client)
        top = registry.manifest(ref.name, top=True)
        manifest = _resolve(top, lambda entry: registry.manifest(_digest_of(entry), top=False))
        config = _parse_config(registry.json_blob(manifest["config"]))
        descriptors = _descriptors(manifest, "layers")
        layers = []
        for number, layer in enumerate(descriptors, 1):
            digest, size = _digest_of(layer), _size_of(layer)
            say(f"pulling layer {number}/{len(descriptors)} {digest[:19]}… {size / _MIB:.1f} MiB")
            layers.append(registry.layer(digest, size, workdir))
        return OciImage(tuple(layers), tuple(_digest_of(d) for d in descriptors), config)


@contextlib.contextmanager
def _registry_errors(reference: str, ref: _Reference) -> Iterator[None]:
    """Map what can go wrong while talking to a registry onto Corral's errors."""
    try:
        yield
    except _Malformed as exc:
        raise InvalidRequest(
            f"image {reference} from {ref.registry} is not a valid OCI or Docker image: {exc}. "
            "Check the reference or re-push the image",
            code="invalid_oci_image",
        ) from exc
    except (httpx.HTTPError, httpx.InvalidURL) as exc:  # refused, timed out, broken transfer
        raise ServiceUnavailable(
            f"cannot reach or talk to registry {ref.registry} ({type(exc).__name__}: {exc}); "
            "check the registry name and this machine's network, then retry",
            code="registry_unreachable",
        ) from exc


class _Registry:
    """One repository on one registry, reached anonymously with the bearer token it hands out."""

    def __init__(self, reference: str, ref: _Reference, client: httpx.Client) -> None:
        self._reference = reference
        self._ref = ref
        self._client = client
        self._token: str | None = None

    def manifest(self, name: str, *, top: bool) -> _Json:
        """The manifest or index called `name` (a tag or digest), checked against its digest."""
        accept = ", ".join(_MANIFEST_TYPES + _INDEX_TYPES)
        with self._get(f"manifests/{name}", accept) as response:
            if response.status_code == 404 and top:
                raise self._not_found()
            self._check(response, f"manifest {name}")
            data = _read_capped(response, f"manifest {name}")
            stated = (
                name if _DIGEST.fullmatch(name) else response.headers.get("docker-content-digest")
            )
        got = f"sha256:{hashlib.sha256(data).hexdigest()}"
        if stated and stated.startswith("sha256:") and got != stated:
            raise _Malformed(f"manifest {name} has digest {got}, not {stated}")
        return _parse_json(data, f"manifest {name}")

    def json_blob(self, descriptor: _Json) -> _Json:
        digest = _digest_of(descriptor)
        with self._get(f"blobs/{digest}", "*/*") as response:
            self._check(response, f"blob {digest}")
            data = _read_capped(response, f"blob {digest}")
        if f"sha256:{hashlib.sha256(data).hexdigest()}" != digest:
            raise _Malformed(f"blob {digest} does not match its digest")
        return _parse_json(data, f"blob {digest}")

    def layer(self, digest: str, size: int, workdir: Path) -> Path:
        with self._get(f"blobs/{digest}", "*/*") as response:
            self._check(response, f"layer {digest}")
            return _store_blob(response.iter_bytes(_CHUNK), workdir, digest, size)

    @contextlib.contextmanager
    def _get(self, path: str, accept: str) -> Iterator[httpx.Response]:
        response = self._send(path, accept)
        # Docker Hub's tokens last five minutes: a long pull asks again when one has expired.
        if response.status_code == 401:
            challenge = response.headers.get("www-authenticate", "")
            response.close()
            self._token = self._fetch_token(challenge)
            response = self._send(path, accept)
        try:
            yield response
        finally:
            response.close()

    def _send(self, path: str, accept: str) -> httpx.Response:
        headers = {"Accept": accept}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        request = self._client.build_request("GET", self._ref.base_url + path, headers=headers)
        return self._client.send(request, stream=True)

    def _fetch_token(self, challenge: str) -> str:
        """An anonymous pull token from the realm a `WWW-Authenticate: Bearer` challenge names."""
        scheme, _, params = challenge.partition(" ")
        fields = dict(re.findall(r'(\w+)="([^"]*)"', params))
        if scheme.lower() != "bearer" or not fields.get("realm", "").startswith("http"):
            raise self._not_found("it asks for credentials")
        query = {key: fields[key] for key in ("service", "scope") if key in fields}
        query.setdefault("scope", f"repository:{self._ref.repository}:pull")
        response = self._client.get(fields["realm"], params=query)
        self._check(response, "token")
        body = _parse_json(response.content, "the token response")
        token = body.get("token") or body.get("access_token")
        if not isinstance(token, str):
            raise _Malformed("the token response holds no token")
        return token

    def _check(self, response: httpx.Response, what: str) -> None:
        status = response.status_code
        if status < 300:
            return
        if status in (401, 403):
            raise self._not_found("access was denied")
        if status == 429 or status >= 500:
            error = ServiceUnavailable(
                f"registry {self._ref.registry} answered {status} for the {what} of "
                f"{self._reference}; retry later",
                code="registry_unreachable",
            )
            error.retry_after = _retry_after(response)
            raise error
        raise _Malformed(f"the registry answered {status} for the {what}")

    def _not_found(self, why: str = "") -> ImageNotFound:
        detail = f" ({why}; Corral pulls anonymously, so private images cannot be pulled)"
        return ImageNotFound(
            f"image {self._reference} not found on registry {self._ref.registry}"
            f"{detail if why else ''}: check the name and tag"
        )


def _read_capped(response: httpx.Response, what: str) -> bytes:
    data = bytearray()
    for chunk in response.iter_bytes():
        data += chunk
        if len(data) > _JSON_LIMIT:
            raise _Malformed(f"{what} is larger than {_JSON_LIMIT // _MIB} MiB")
    return bytes(data)


def _retry_after(response: httpx.Response) -> int | None:
    value = response.headers.get("retry-after", "")
    return int(value) if value.isdigit() else None


# -- unpacking one layer ---------------------------------------------------------------------------

_OPAQUE_XATTR = "trusted.overlay.opaque"
_WHITEOUT_PREFIX = ".wh."
_OPAQUE_MARKER = ".wh..wh..opq"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Errors that a hostile or broken layer provokes (a name through a symlink or a file, a name too
# long); anything else (no space, not root) is about this machine and propagates as it is.
_LAYER_ERRNOS = (errno.ELOOP, errno.ENOTDIR, errno.ENAMETOOLONG, errno.EMLINK)


def unpack_layer(blob: Path, dest: Path) -> None:
    """Apply one layer blob (a tar, possibly gzip'd) into the new directory `dest`.

    The result is an overlayfs lower layer: whiteouts become 0:0 character devices, opaque
    markers the ``trusted.overlay.opaque`` xattr; files keep their numeric owner, mode
    (setuid/setgid/sticky included) and mtime. Device nodes are skipped (sandboxes mount nodev),
    and so are xattrs from the archive: a layer must never choose overlay or security xattrs.
    Directories a layer does not list get mode 0755 and root ownership.

    The layer is unpacked into a hidden sibling and renamed to `dest` at the end, so `dest` is
    either complete or absent.

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
            _unpack_into(source, temporary, blob)
            temporary.rename(dest)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise


def _unpack_into(source: IO[bytes], root: Path, blob: Path) -> None:
    unpacker = _Unpacker(root)
    try:
        # Stream mode reads the layer once, front to back, never holding it in memory.
        with _open_tar(source, "r|*") as tar:
            for member in tar:
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
