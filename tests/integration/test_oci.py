"""Pulling images from a real registry: Debian's docker-registry, started by the tests on a free port.

Images are pushed with plain calls to the registry API, then pulled with `corral.images.oci.pull`. A
second registry demands bearer tokens from a token server the tests run, as Docker Hub does.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.server
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from corral.core.errors import ImageNotFound, InvalidRequest, ServiceUnavailable
from corral.images.oci import machine_platform, pull, unpack_layer
from corral.images.oci.egress import Egress

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o755, 1_600_000_000
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(out.getvalue(), mtime=0)


# -- registries ------------------------------------------------------------------------------------

# The tests' registries and token servers listen on loopback, which pulls may reach only when
# the operator allows it by name (tests/isolation/test_egress.py checks the refusals).
LOCAL = Egress.of(["127.0.0.1"])


@dataclass
class Registry:
    """A running docker-registry: its host:port, storage directory, and a client that pushes."""

    host: str
    storage: Path
    client: httpx.Client


def start_registry(root: Path, auth: str = "") -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("docker-registry")
    if binary is None:
        pytest.skip("docker-registry is not installed: run `sudo scripts/setup --dev`")
    host = f"127.0.0.1:{free_port()}"
    config = root / "config.yml"
    config.write_text(
        f"version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root}/data\n"
        f"http:\n  addr: {host}\n{auth}"
    )
    with (root / "registry.log").open("wb") as log:
        process = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=log)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"http://{host}/v2/", timeout=1).status_code in (200, 401):
                return process, host
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    process.wait()
    pytest.skip(f"docker-registry did not start: {(root / 'registry.log').read_text()[-500:]}")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    root = tmp_path_factory.mktemp("registry")
    process, host = start_registry(root)
    with httpx.Client(base_url=f"http://{host}/v2/", timeout=10) as client:
        yield Registry(host, root / "data", client)
    stop(process)


def push_blob(
    registry: Registry, repository: str, data: bytes, media_type: str
) -> dict[str, object]:
    started = registry.client.post(f"{repository}/blobs/uploads/")
    assert started.status_code == 202, started.text
    # The upload URL carries its own state in its query: the digest is added to it, not put instead.
    location = httpx.URL(started.headers["location"]).copy_merge_params({"digest": sha(data)})
    done = registry.client.put(
        location,
        content=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert done.status_code == 201, done.text
    return {"mediaType": media_type, "digest": sha(data), "size": len(data)}


def push_manifest(
    registry: Registry, repository: str, tag: str, document: dict[str, object]
) -> dict[str, object]:
    body = json.dumps(document).encode()
    media_type = str(document["mediaType"])
    pushed = registry.client.put(
        f"{repository}/manifests/{tag}", content=body, headers={"Content-Type": media_type}
    )
    assert pushed.status_code == 201, pushed.text
    return {"mediaType": media_type, "digest": sha(body), "size": len(body)}


@dataclass
class Pushed:
    """What `push_image` put in the registry, to compare a pull against."""

    layers: list[bytes]
    manifest: dict[str, object]
    index: dict[str, object] | None = None


def push_image(
    registry: Registry,
    repository: str,
    tag: str,
    layers: list[bytes],
    env: list[str],
    *,
    docker: bool = False,
) -> Pushed:
    """One image (config + layers + manifest), in OCI media types or Docker v2 ones."""
    diff_ids = [sha(gzip.decompress(blob)) for blob in layers]
    config = {
        "architecture": machine_platform()[1],
        "os": "linux",
        "config": {"Env": env, "Cmd": ["/bin/app"], "WorkingDir": "/srv"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    config_type = DOCKER_CONFIG if docker else "application/vnd.oci.image.config.v1+json"
    layer_type = DOCKER_LAYER if docker else "application/vnd.oci.image.layer.v1.tar+gzip"
    manifest = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
        "config": push_blob(registry, repository, json.dumps(config).encode(), config_type),
        "layers": [push_blob(registry, repository, blob, layer_type) for blob in layers],
    }
    return Pushed(layers, push_manifest(registry, repository, tag, manifest))


@pytest.fixture(scope="module")
def multiplatform(registry: Registry) -> Pushed:
    """tools/python:3.12, an index of two platforms: this machine's and s390x (Docker types)."""
    ours = push_image(
        registry,
        "tools/python",
        "ours",
        [layer({"bin/app": b"#!/bin/sh\necho ours\n"}), layer({"etc/os-release": b"ID=test\n"})],
        ["PLATFORM=ours", "PATH=/bin"],
    )
    other = push_image(
        registry,
        "tools/python",
        "other",
        [layer({"bin/app": b"s390x"})],
        ["PLATFORM=other"],
        docker=True,
    )
    os_name, architecture = machine_platform()
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {**other.manifest, "platform": {"os": "linux", "architecture": "s390x"}},
            {**ours.manifest, "platform": {"os": os_name, "architecture": architecture}},
        ],
    }
    ours.index = push_manifest(registry, "tools/python", "3.12", index)
    return ours


# -- pulling ---------------------------------------------------------------------------------------


def test_pull_index_by_tag_picks_this_platform(
    registry: Registry, multiplatform: Pushed, tmp_path: Path
) -> None:
    lines: list[str] = []
    image = pull(
        f"{registry.host}/tools/python:3.12", tmp_path, egress=LOCAL, progress=lines.append
    )
    assert [path.read_bytes() for path in image.layers] == multiplatform.layers
    assert image.digests == tuple(sha(blob) for blob in multiplatform.layers)
    assert image.config.env == {"PLATFORM": "ours", "PATH": "/bin"}
    assert image.config.cmd == ("/bin/app",)
    assert image.config.workdir == "/srv" and image.config.user is None
    assert [line.split()[:3] for line in lines] == [
        ["pulling", "layer", "1/2"],
        ["pulling", "layer", "2/2"],
    ]
    assert all(line.endswith("MiB") and "sha256:" in line for line in lines)
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in image.layers)


def test_pull_by_digest_of_index_and_of_manifest(
    registry: Registry, multiplatform: Pushed, tmp_path: Path
) -> None:
    assert multiplatform.index is not None
    for number, digest in enumerate(
        [multiplatform.index["digest"], multiplatform.manifest["digest"]]
    ):
        workdir = tmp_path / str(number)
        workdir.mkdir()
        image = pull(f"{registry.host}/tools/python@{digest}", workdir, egress=LOCAL)
        assert image.digests == tuple(sha(blob) for blob in multiplatform.layers)
        assert image.config.env["PLATFORM"] == "ours"


def test_pull_docker_v2_manifest(registry: Registry, multiplatform: Pushed, tmp_path: Path) -> None:
    image = pull(f"{registry.host}/tools/python:other", tmp_path, egress=LOCAL)
    assert image.config.env == {"PLATFORM": "other"}
    assert [path.read_bytes() for path in image.layers] == [layer({"bin/app": b"s390x"})]


def test_pulled_layers_unpack(registry: Registry, multiplatform: Pushed, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("unpacking layers chowns files: root only")
    (workdir := tmp_path / "blobs").mkdir()
    image = pull(f"{registry.host}/tools/python:3.12", workdir, egress=LOCAL)
    unpack_layer(image.layers[0], tmp_path / "layer-0")
    assert (tmp_path / "layer-0/bin/app").read_bytes() == b"#!/bin/sh\necho ours\n"


@pytest.mark.parametrize(
    "name", ["tools/python:nope", "tools/absent:1", "tools/python@sha256:" + "0" * 64]
)
def test_unknown_image_is_not_found(
    registry: Registry, multiplatform: Pushed, tmp_path: Path, name: str
) -> None:
    reference = f"{registry.host}/{name}"
    with pytest.raises(ImageNotFound) as caught:
        pull(reference, tmp_path, egress=LOCAL)
    assert reference in caught.value.message and caught.value.code == "image_not_found"
    assert os.listdir(tmp_path) == []


def test_down_registry_fails_fast(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable) as caught:
        pull(f"127.0.0.1:{free_port()}/tools/python:3.12", tmp_path, egress=LOCAL)
    assert caught.value.code == "registry_unreachable"
    assert time.monotonic() - started < 10
    assert os.listdir(tmp_path) == []


def test_corrupt_blob_in_registry_is_refused(registry: Registry, tmp_path: Path) -> None:
    blobs = [layer({"good": b"first"}), layer({"bad": os.urandom(4096)})]
    push_image(registry, "tools/corrupt", "1", blobs, [])
    hex_digest = sha(blobs[1])[7:]
    stored = (
        registry.storage / f"docker/registry/v2/blobs/sha256/{hex_digest[:2]}/{hex_digest}/data"
    )
    data = bytearray(stored.read_bytes())
    data[-20] ^= 0xFF  # same size, different content: the registry serves it as it is
    stored.write_bytes(bytes(data))
    with pytest.raises(InvalidRequest) as caught:
        pull(f"{registry.host}/tools/corrupt:1", tmp_path, egress=LOCAL)
    assert caught.value.code == "invalid_oci_image" and hex_digest in caught.value.message
    assert os.listdir(tmp_path) == []  # the first, good layer is removed too


# -- bearer-token auth, as on Docker Hub -----------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenIssuer:
    """Issues the RS256 JWTs docker-registry's token auth verifies, signed with openssl."""

    def __init__(self, root: Path) -> None:
        if shutil.which("openssl") is None:
            pytest.skip("openssl is not installed: it signs the test registry's tokens")
        self.key, self.cert = root / "key.pem", root / "cert.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", "/CN=corral-test-token", "-keyout", self.key, "-out", self.cert],
            check=True, capture_output=True,
        )  # fmt: skip
        der = subprocess.run(
            ["openssl", "x509", "-in", self.cert, "-outform", "DER"],
            check=True,
            capture_output=True,
        ).stdout
        self.header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        self.requests: list[dict[str, list[str]]] = []

    def token(self, scope: str) -> str:
        kind, name, actions = scope.split(":")
        now = int(time.time())
        claims = {
            "iss": "corral-test-issuer", "sub": "", "aud": "corral-test-registry",
            "exp": now + 300, "nbf": now - 10, "iat": now, "jti": os.urandom(8).hex(),
            "access": [{"type": kind, "name": name, "actions": actions.split(",")}],
        }  # fmt: skip
        signed = f"{b64url(json.dumps(self.header).encode())}.{b64url(json.dumps(claims).encode())}"
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", self.key],
            input=signed.encode(), check=True, capture_output=True,
        ).stdout  # fmt: skip
        return f"{signed}.{b64url(signature)}"

    def serve(self) -> tuple[http.server.ThreadingHTTPServer, str]:
        issuer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
                issuer.requests.append(query)
                body = json.dumps({"token": issuer.token(query["scope"][0])}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server, f"http://127.0.0.1:{server.server_address[1]}/token"


@pytest.fixture(scope="module")
def token_registry(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Registry, TokenIssuer]]:
    root = tmp_path_factory.mktemp("token-registry")
    issuer = TokenIssuer(root)
    server, realm = issuer.serve()
    auth = (
        f"auth:\n  token:\n    realm: {realm}\n    service: corral-test-registry\n"
        f"    issuer: corral-test-issuer\n    rootcertbundle: {issuer.cert}\n"
    )
    process, host = start_registry(root, auth)
    token = issuer.token("repository:private/app:pull,push")
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=f"http://{host}/v2/", timeout=10, headers=headers) as client:
        yield Registry(host, root / "data", client), issuer
    stop(process)
    server.shutdown()
    server.server_close()


def test_pull_with_anonymous_bearer_token(
    token_registry: tuple[Registry, TokenIssuer], tmp_path: Path
) -> None:
    registry, issuer = token_registry
    assert httpx.get(f"http://{registry.host}/v2/private/app/tags/list").status_code == 401
    pushed = push_image(registry, "private/app", "1", [layer({"x": b"behind a token"})], ["A=1"])
    issuer.requests.clear()
    image = pull(f"{registry.host}/private/app:1", tmp_path, egress=LOCAL)
    assert [path.read_bytes() for path in image.layers] == pushed.layers
    assert issuer.requests == [
        {"service": ["corral-test-registry"], "scope": ["repository:private/app:pull"]}
    ]
