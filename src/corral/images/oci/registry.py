"""Images pulled from registries over the HTTP API v2, anonymously or with a bearer token."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from corral.core.errors import ImageNotFound, InvalidRequest, PermissionDenied, ServiceUnavailable
from corral.images.oci.egress import REFUSED, Egress, GuardedTransport
from corral.images.oci.manifest import (
    _CHUNK,
    _DIGEST,
    _JSON_LIMIT,
    _MIB,
    OciImage,
    StatusLine,
    _descriptors,
    _digest_of,
    _Json,
    _Malformed,
    _parse_config,
    _parse_json,
    _removing_new_entries,
    _resolve,
    _size_of,
    _store_blob,
)
from corral.images.oci.unpack import MAX_IMAGE_BYTES

_MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
_INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)

_DOCKER_HUB = "registry-1.docker.io"
_DOCKER_HUB_NAMES = ("docker.io", "index.docker.io", _DOCKER_HUB)
_LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
# Connect fails fast on a down registry; read bounds each wait for bytes, not a whole layer.
_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
_REPOSITORY_PART = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"\w[\w.-]{0,127}")
_REGISTRY_HOST = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\])(?::[0-9]+)?")


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


def pull(
    reference: str, workdir: Path, *, egress: Egress, progress: StatusLine | None = None
) -> OciImage:
    """Pull an image from a registry (HTTP API v2, anonymous) into `workdir`, connecting only
    where `egress` allows (see `corral.images.oci.egress`).

    Layers are streamed to disk and verified against their sha256 digests; an index yields this
    machine's platform.

    Raises:
        InvalidRequest: code ``invalid_image_reference`` for a malformed reference,
            ``invalid_oci_image`` for a manifest, config or blob that breaks the format.
        ImageNotFound: the registry has no such image or tag (or keeps it private).
        PermissionDenied: code ``registry_not_allowed`` when the registry, a redirect or a
            token realm is not a public address and the operator has not allowed it by name.
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
        httpx.Client(
            timeout=_TIMEOUT,
            follow_redirects=True,
            max_redirects=5,
            transport=GuardedTransport(egress),
            trust_env=False,
        ) as client,
    ):
        registry = _Registry(reference, ref, client)
        top = registry.manifest(ref.name, top=True)
        manifest = _resolve(top, lambda entry: registry.manifest(_digest_of(entry), top=False))
        config = _parse_config(registry.json_blob(manifest["config"]))
        descriptors = _descriptors(manifest, "layers")
        declared = sum(_size_of(layer) for layer in descriptors)
        if declared > MAX_IMAGE_BYTES:  # nothing is downloaded of an image too big to unpack
            raise _Malformed(f"its layers take {declared / _MIB:,.0f} MiB, more than 32 GiB")
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
    except httpx.ConnectError as exc:
        if str(exc) != REFUSED:
            raise _unreachable(ref, exc) from exc
        # Worded the same whatever is (or is not) behind the address: nothing was sent there.
        raise PermissionDenied(
            f"image {reference}: {ref.registry} (or where it sent the pull) is not a public "
            "registry; this server pulls only from public registries and from those its "
            "operator allows (corral serve --allow-registry NAME)",
            code="registry_not_allowed",
        ) from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:  # refused, timed out, broken transfer
        raise _unreachable(ref, exc) from exc


def _unreachable(ref: _Reference, exc: Exception) -> ServiceUnavailable:
    return ServiceUnavailable(
        f"cannot reach or talk to registry {ref.registry} ({type(exc).__name__}: {exc}); "
        "check the registry name and this machine's network, then retry",
        code="registry_unreachable",
    )


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
