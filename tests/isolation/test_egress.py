"""Image pulls cannot be turned on the host: a reference, a redirect or a token realm that names
the host's loopback, a private network or a cloud metadata address is refused before anything
connects (listeners on loopback see nothing), and the refusal reads the same whether something
listens there or not. Only registries the operator allows by name may be private."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from corral.core.errors import PermissionDenied, ServiceUnavailable
from corral.images.oci import pull
from corral.images.oci.egress import Egress, is_public


class Listener:
    """A TCP listener on loopback that counts who connects to it."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.server.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.server.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    made = Listener()
    yield made
    made.close()


def fake_registry(answer: Callable[[http.server.BaseHTTPRequestHandler], None]) -> Listener:
    """A registry on loopback that answers every request with `answer`."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            answer(self)

        def log_message(self, *_args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    made = Listener.__new__(Listener)
    made.port = int(server.server_address[1])
    made.close = lambda: (server.shutdown(), server.server_close())  # type: ignore[method-assign]
    return made


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.8.9.10",
        "0.0.0.0",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "169.254.169.254",
        "224.0.0.1",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "168.63.129.16",
    ],
)
def test_private_addresses_are_not_public(address: str) -> None:
    assert not is_public(address)


def test_public_addresses_are() -> None:
    assert is_public("8.8.8.8") and is_public("2001:4860:4860::8888")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]"])
def test_a_reference_to_the_host_is_refused_unconnected(
    host: str, listener: Listener, tmp_path: Path
) -> None:
    with pytest.raises(PermissionDenied) as refused:
        pull(f"{host}:{listener.port}/team/tool:1", tmp_path, egress=Egress())
    assert refused.value.code == "registry_not_allowed"
    assert listener.connections == 0
    assert list(tmp_path.iterdir()) == []


def test_metadata_addresses_are_refused_at_once(tmp_path: Path) -> None:
    for host in ("169.254.169.254", "168.63.129.16", "100.100.100.200", "10.0.0.1:5000"):
        with pytest.raises(PermissionDenied):
            pull(f"{host}/latest/meta-data:1", tmp_path, egress=Egress())


def test_refusals_do_not_tell_open_ports_from_closed(listener: Listener, tmp_path: Path) -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    messages = []
    for port in (listener.port, closed_port):
        with pytest.raises(PermissionDenied) as refused:
            pull(f"127.0.0.1:{port}/x/y:1", tmp_path, egress=Egress())
        messages.append(refused.value.message.replace(str(port), "PORT"))
    assert messages[0] == messages[1]
    assert listener.connections == 0


def test_an_allowed_registry_cannot_send_the_pull_elsewhere(
    listener: Listener, tmp_path: Path
) -> None:
    """Allowed by name, a registry still cannot point a redirect or a token realm at
    another private address."""

    def realm(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(401)
        challenge = f'Bearer realm="http://127.0.0.1:{listener.port}/token",service="x"'
        handler.send_header("WWW-Authenticate", challenge)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    def redirect(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(307)
        handler.send_header("Location", f"http://127.0.0.1:{listener.port}{handler.path}")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    for answer in (realm, redirect):
        registry = fake_registry(answer)
        try:
            allowed = Egress.of([f"127.0.0.1:{registry.port}"])
            with pytest.raises(PermissionDenied) as refused:
                pull(f"127.0.0.1:{registry.port}/team/tool:1", tmp_path, egress=allowed)
            assert refused.value.code == "registry_not_allowed"
        finally:
            registry.close()
    assert listener.connections == 0


def test_an_allowed_registry_is_reached(listener: Listener, tmp_path: Path) -> None:
    """The same listener, allowed by name, is connected to (and is no registry)."""
    with pytest.raises(ServiceUnavailable):
        pull(
            f"127.0.0.1:{listener.port}/team/tool:1",
            tmp_path,
            egress=Egress.of([f"127.0.0.1:{listener.port}"]),
        )
    assert listener.connections >= 1
