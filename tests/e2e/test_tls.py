"""`corral serve` over TLS 1.3 as a user runs it: `--tls auto` on a fresh data directory, the
SDK, its streams and the CLI trusting the printed CA, and everything else refused."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from corral.client import AsyncClient, AsyncSandbox, Client
from corral.core.errors import ConnectionFailed
from corral.server import tls
from tests.conftest import require_runtime
from tests.e2e.conftest import SERVER_DIR, Server, start_server

CORRAL = [sys.executable, "-m", "corral"]


@pytest.fixture(scope="module")
def tls_server(data_dir: Path) -> Iterator[Server]:
    require_runtime("namespaces")
    directory = SERVER_DIR.with_name(SERVER_DIR.name + "-tls")
    for stale in (directory / "tls").glob("*"):
        stale.unlink()  # a fresh CA, as on a first start
    running = start_server(directory, data_dir / "images", "--tls", "auto")
    yield running
    running.stop_and_clean()


def ca_of(server: Server) -> Path:
    return server.data_dir / "tls" / "ca.pem"


def test_the_banner_names_the_ca_and_its_fingerprint(tls_server: Server) -> None:
    banner = tls_server.log.read_text()
    assert f"https://127.0.0.1:{tls_server.port}" in banner
    der = ssl.PEM_cert_to_DER_cert(ca_of(tls_server).read_text())
    fingerprint = ":".join(f"{byte:02X}" for byte in hashlib.sha256(der).digest())
    assert fingerprint in banner
    assert f"CORRAL_CA={ca_of(tls_server)}" in banner
    assert "warning" not in banner


async def test_the_sdk_and_its_streams_work_over_tls(tls_server: Server) -> None:
    ca = str(ca_of(tls_server))
    async with AsyncClient(url=tls_server.url, api_key=tls_server.admin_key, ca=ca) as client:
        sandbox = await AsyncSandbox.create(client=client, runtime="namespaces")
        try:
            assert (await sandbox.run("echo $((6*7))")).stdout == "42\n"
            seen: list[bytes] = []
            process = await sandbox.exec("echo", "streamed", on_stdout=seen.append)  # WebSocket
            assert await process.wait() == 0
            assert b"".join(seen) == b"streamed\n"
            await sandbox.files.write("/root/x.bin", os.urandom(3 << 20))
            assert len(await sandbox.files.read("/root/x.bin")) == 3 << 20
        finally:
            await sandbox.terminate()


def test_the_cli_trusts_corral_ca(tls_server: Server) -> None:
    env = {
        **os.environ,
        "CORRAL_URL": tls_server.url,
        "CORRAL_API_KEY": tls_server.admin_key,
        "CORRAL_CA": str(ca_of(tls_server)),
    }
    argv = [*CORRAL, "run", "--runtime", "namespaces", "--", "echo over tls"]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert (done.returncode, done.stdout) == (0, "over tls\n"), done.stderr
    env.pop("CORRAL_CA")
    refused = subprocess.run(
        [*CORRAL, "sandbox", "list"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert refused.returncode != 0
    assert "CORRAL_CA" in refused.stderr


def test_an_unverified_server_is_refused_unless_told_otherwise(tls_server: Server) -> None:
    with Client(url=tls_server.url, api_key=tls_server.admin_key) as untrusting:
        with pytest.raises(ConnectionFailed) as refused:
            untrusting.list_pools()
        assert "does not trust" in refused.value.message
        assert "CORRAL_CA" in refused.value.message
    with Client(url=tls_server.url, api_key=tls_server.admin_key, verify=False) as trusting:
        assert isinstance(trusting.list_pools(), list)
    # Another CA is no better than none.
    other = tls.auto_files(SERVER_DIR.with_name(SERVER_DIR.name + "-other-ca"), "127.0.0.1").ca
    wrong = Client(url=tls_server.url, api_key=tls_server.admin_key, ca=str(other))
    with wrong, pytest.raises(ConnectionFailed):
        wrong.list_pools()


def test_only_tls_13_is_spoken(tls_server: Server) -> None:
    old = ssl.create_default_context(cafile=str(ca_of(tls_server)))
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    address = ("127.0.0.1", tls_server.port)
    with socket.create_connection(address, timeout=10) as raw, pytest.raises(ssl.SSLError):
        old.wrap_socket(raw, server_hostname="127.0.0.1")
    current = ssl.create_default_context(cafile=str(ca_of(tls_server)))
    with (
        socket.create_connection(address, timeout=10) as raw,
        current.wrap_socket(raw, server_hostname="localhost") as secured,
    ):
        assert secured.version() == "TLSv1.3"
    # Plain HTTP to the TLS port gets no answer a client could mistake for the API's.
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{tls_server.port}/healthz", timeout=10).raise_for_status()


def test_the_operators_own_certificate(tls_server: Server, data_dir: Path) -> None:
    made = tls_server.data_dir / "tls"
    directory = SERVER_DIR.with_name(SERVER_DIR.name + "-tls-own")
    own = start_server(
        directory,
        data_dir / "images",
        "--tls-cert",
        str(made / "server.pem"),
        "--tls-key",
        str(made / "server.key"),
    )
    try:
        assert not (directory / "tls").exists()
        with Client(url=own.url, api_key=own.admin_key, ca=str(ca_of(tls_server))) as client:
            assert isinstance(client.list_pools(), list)
        assert re.search(r"TLS 1\.3 with .*server\.pem", own.log.read_text())
    finally:
        own.stop_and_clean()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--tls", "bogus"], "--tls must be 'auto' or 'off'"),
        (["--tls-cert", "/nonexistent/cert.pem"], "go together"),
        (["--tls-cert", "/nonexistent/c.pem", "--tls-key", "/nonexistent/k.pem"], "cannot use"),
        (["--tls", "auto", "--tls-key", "/nonexistent/k.pem"], "makes its own"),
        (["--tls-name", "corral.example"], "for --tls auto"),
    ],
)
def test_bad_tls_options_are_clear_errors(tmp_path: Path, args: list[str], says: str) -> None:
    argv = [*CORRAL, "serve", "--data-dir", str(tmp_path), "--no-prepare", *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert "invalid_tls" in done.stderr
    assert says in done.stderr


def test_plain_http_on_every_address_warns(data_dir: Path) -> None:
    server = Server(SERVER_DIR.with_name(SERVER_DIR.name + "-plain"), data_dir / "images")
    server.extra = ("--host", "0.0.0.0")
    server.start()
    try:
        assert "warning: serving plain HTTP on 0.0.0.0" in server.log.read_text()
    finally:
        server.stop_and_clean()


NODE_PROGRAM = """
import { ConnectionFailed, Sandbox } from "@corral/sdk";
try {
  const sandbox = await Sandbox.create({ runtime: "namespaces" });
  const ran = await sandbox.run("echo $((6*7))");
  const streamed = await sandbox.exec(["echo", "streamed"]);  // a WebSocket
  console.log(JSON.stringify([ran.stdout, await streamed.stdout.text()]));
  await sandbox.terminate();
} catch (error) {
  console.log(JSON.stringify([error.constructor.name, error.message]));
}
"""


def test_the_typescript_sdk_and_its_streams_work_over_tls(
    tls_server: Server, tmp_path: Path
) -> None:
    sdk = Path(__file__).resolve().parents[2] / "sdk" / "typescript"
    tsc = sdk / "node_modules" / ".bin" / "tsc"
    assert tsc.exists(), "the TypeScript SDK's tools are missing: run scripts/setup --dev"
    subprocess.run([str(tsc), "-p", str(sdk)], check=True, timeout=300)
    script = tmp_path / "tls.mjs"
    script.write_text(NODE_PROGRAM.replace("@corral/sdk", str(sdk / "dist" / "index.js")))
    env = {**os.environ, "CORRAL_URL": tls_server.url, "CORRAL_API_KEY": tls_server.admin_key}
    env.pop("NODE_EXTRA_CA_CERTS", None)

    def run(extra: dict[str, str]) -> list[str]:
        done = subprocess.run(
            ["node", str(script)],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return list(json.loads(done.stdout))

    assert run({"NODE_EXTRA_CA_CERTS": str(ca_of(tls_server))}) == ["42\n", "streamed\n"]
    name, message = run({})
    assert name == "ConnectionFailed" and "NODE_EXTRA_CA_CERTS" in message, message
