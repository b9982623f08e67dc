"""One tenant flooding the server (pulls from a registry that never finishes answering, execs
of heavy output, uploads that trickle) leaves /healthz and another tenant's work served."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from corral import Sandbox
from tests.conftest import require_runtime
from tests.e2e.conftest import SERVER_DIR, start_server

HANG = 120.0  # what a flood call may take at most before the test stops it


class TricklingRegistry:
    """Answers every request with a promise of a big body and then one byte a second: a pull
    from it holds its thread for as long as the registry goes on, never timing out."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.5)
        self.port = self.listener.getsockname()[1]
        self.serving = threading.Thread(target=self._serve, daemon=True)
        self.serving.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed
                return
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                conn.sendall(head + b"Content-Length: 4000\r\n\r\n")
                while not self.stop.wait(1.0):
                    conn.sendall(b" ")
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        self.serving.join()
        self.listener.close()


def test_one_tenant_flooding_leaves_the_others_served(data_dir: Path) -> None:
    require_runtime("namespaces")
    registry = TricklingRegistry()
    server = start_server(SERVER_DIR.with_name(SERVER_DIR.name + "-fair"), data_dir / "images")
    flooder, other = server.new_key("flooder"), server.new_key("other")
    statuses: list[int] = []
    threads: list[threading.Thread] = []

    def call(method: str, path: str, **extra: object) -> None:
        headers = {"Authorization": f"Bearer {flooder}"}
        if method == "PUT":  # an upload that trickles, each its own
            extra["content"] = trickle()
        try:
            answer = httpx.request(
                method,
                server.url + path,
                headers=headers,
                timeout=HANG,
                **extra,  # type: ignore[arg-type]
            )
            statuses.append(answer.status_code)
        except httpx.HTTPError:
            statuses.append(0)

    def trickle() -> Iterator[bytes]:
        for _ in range(int(HANG)):
            if registry.stop.is_set():
                return
            yield b"x" * 1024
            time.sleep(1.0)

    try:
        with server.client(flooder) as client:
            loud = Sandbox.create(runtime="namespaces", timeout=600, client=client)

        def pull(tag: int) -> dict[str, Any]:  # each its own: one pull is never made twice
            reference = f"localhost:{registry.port}/a/b:t{tag}"
            return {"json": {"recipe": {"base": {"kind": "registry", "reference": reference}}}}

        floods: list[tuple[str, str, dict[str, Any]]] = [
            *[("POST", "/v1/images", pull(tag)) for tag in range(8)],
            *[
                (
                    "POST",
                    f"/v1/sandboxes/{loud.id}/exec",
                    {"json": {"cmd": "head -c 10000000 /dev/zero; sleep 20", "timeout": 60}},
                )
            ]
            * 24,
            *[("PUT", f"/v1/blobs/sha256:{'0' * 64}", {})] * 8,
        ]
        for method, path, extra in floods:
            threads.append(threading.Thread(target=call, args=(method, path), kwargs=extra))
            threads[-1].start()
        time.sleep(5)  # the flood takes hold
        served: list[str] = []

        def the_other_tenant() -> None:
            assert httpx.get(f"{server.url}/healthz", timeout=HANG).status_code == 200
            with (
                server.client(other) as client,
                Sandbox.create(runtime="namespaces", client=client) as box,
            ):
                served.append(box.run("echo served").stdout)

        worker = threading.Thread(target=the_other_tenant)
        worker.start()
        worker.join(timeout=60)  # a hang, not a speed: the flood goes on for two minutes
        assert served == ["served\n"], "the other tenant was not served during the flood"
        assert 429 in statuses  # the flooder met its own limits
    finally:
        registry.close()
        for thread in threads:
            thread.join(timeout=HANG)
        server.stop_and_clean()
