"""A real Corral server in a subprocess on a free port, and SDK clients for it.

The server gets its own data directory (its engine must be the only one using it) whose
`images` link to the shared test images, so the debian image is built once for all tests.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path

import httpx
import pytest

from corral.client import AsyncClient, Client
from corral.engine import Engine
from tests.conftest import require_runtime

SERVER_DIR = Path(os.environ.get("CORRAL_TEST_SERVER_DIR", "/var/tmp/corral-test-server"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Server:
    """`corral serve` as a user starts it, with an admin key from CORRAL_API_KEY."""

    def __init__(
        self,
        data_dir: Path,
        images: Path,
        *extra: str,
        env: Mapping[str, str] | None = None,
        python: str = sys.executable,  # another checkout's, for an A/B (bench/ab.py)
        start_timeout: float = 60,  # a cluster's front answers once its nodes do
    ) -> None:
        self.data_dir = data_dir
        self.python = python
        self.env = dict(env or {})  # set for the server's process only
        self.port = free_port()
        secure = any(arg.startswith("--tls") for arg in extra)
        self.url = f"{'https' if secure else 'http'}://127.0.0.1:{self.port}"
        self.admin_key = "corral_test_" + secrets.token_urlsafe(16)
        self.extra = extra
        self.start_timeout = start_timeout
        self.process: subprocess.Popen[bytes] | None = None
        data_dir.mkdir(parents=True, exist_ok=True)
        images.mkdir(parents=True, exist_ok=True)  # on a fresh machine no engine made it yet
        link = data_dir / "images"
        if not link.exists():
            link.symlink_to(images)
        self.log = data_dir / "server.log"

    def start(self) -> None:
        # `localhost` registries (the tests start their own) may be pulled from; 127.0.0.1 ones
        # may not, as on any server (test_images.py checks both).
        env = {**os.environ, "CORRAL_API_KEY": self.admin_key}
        env["CORRAL_ALLOWED_REGISTRIES"] = "localhost"
        env.update(self.env)
        env.setdefault("CORRAL_ALLOWED_WEBHOOK_HOSTS", "localhost")  # webhooks to test receivers
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    self.python,
                    "-m",
                    "corral",
                    "serve",
                    "--port",
                    str(self.port),
                    "--data-dir",
                    str(self.data_dir),
                    "--no-prepare",
                    "--log-level",
                    "warning",
                    *self.extra,
                ],
                env=env,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.logs()}")
            try:
                # Readiness only: TLS tests check the certificate themselves.
                up = httpx.get(f"{self.url}/healthz", timeout=1, verify=False)  # noqa: S501
                if up.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not start: {self.logs()}")

    def logs(self) -> str:
        """The end of its log, and of a cluster's agent's and nodes' (CI keeps no files)."""
        found = [self.log, self.data_dir / "cluster" / "agent.log"]
        found += sorted(self.data_dir.glob("nodes/*/server.log"))
        return "\n".join(
            f"--- {log}:\n{log.read_text(errors='replace')[-3000:]}"
            for log in found
            if log.exists()
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        self.process.send_signal(sig)
        self.process.wait(timeout=60)
        self.process = None

    def client(self, key: str | None = None) -> Client:
        return Client(url=self.url, api_key=key or self.admin_key)

    def new_key(self, name: str = "tenant") -> str:
        response = httpx.post(
            f"{self.url}/v1/keys",
            json={"name": name},
            headers={"Authorization": f"Bearer {self.admin_key}"},
        )
        response.raise_for_status()
        return str(response.json()["secret"])

    def stop_and_clean(self) -> None:
        """Stop the server, then end every sandbox it left running (an engine adopts and
        ends them), so no other test sees them."""
        self.stop()

        async def end_all() -> None:
            async with Engine(self.data_dir):
                pass

        asyncio.run(end_all())


def start_server(
    data_dir: Path,
    images: Path,
    *extra: str,
    env: Mapping[str, str] | None = None,
    python: str = sys.executable,
    start_timeout: float = 60,
) -> Server:
    for stale in data_dir.glob("corral.db*"):
        stale.unlink()
    server = Server(data_dir, images, *extra, env=env, python=python, start_timeout=start_timeout)
    server.start()
    return server


@pytest.fixture(scope="module")
def server(data_dir: Path) -> Iterator[Server]:
    require_runtime("namespaces")
    running = start_server(SERVER_DIR, data_dir / "images")
    yield running
    running.stop_and_clean()


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    with server.client() as made:
        yield made


@pytest.fixture
async def aclient(server: Server) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(url=server.url, api_key=server.admin_key) as made:
        yield made
