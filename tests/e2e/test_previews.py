"""Previews: a real web server in sandboxes of both runtimes, reached through Corral with
httpx, by path and by host name; streaming both ways, Server-Sent Events, the token's
cookie, every refusal, and a sleeping sandbox woken by a request."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets

from corral import Client, Preview, Sandbox
from tests.conftest import require_runtime
from tests.e2e.conftest import SERVER_DIR, Server, start_server

APP = (Path(__file__).parent / "apps" / "web.py").read_text()
ECHO = (Path(__file__).parent / "apps" / "wsecho.py").read_text()
DOMAIN = "preview.test"


@pytest.fixture(scope="module")
def server(data_dir: Path) -> Iterator[Server]:
    """A server with a preview domain (previews by host name and by path)."""
    require_runtime("namespaces")
    running = start_server(SERVER_DIR, data_dir / "images", "--preview-domain", DOMAIN)
    yield running
    running.stop_and_clean()


def serving(client: Client, runtime: str, port: int = 8000) -> Sandbox:
    """A sandbox (no network) running tests/e2e/apps/web.py on `port`, and the WebSocket
    echo server (apps/wsecho.py) on 8765."""
    sandbox = Sandbox.create(runtime=runtime, client=client)
    sandbox.files.write("/srv/web.py", APP)
    sandbox.files.write("/srv/wsecho.py", ECHO)
    sandbox.run(f"nohup python3 /srv/web.py {port} > /tmp/web.log 2>&1 &")
    sandbox.run("nohup python3 /srv/wsecho.py 8765 > /tmp/ws.log 2>&1 &")
    return sandbox


def at(server: Server, preview: Preview) -> str:
    """The preview's address by path on the test server (its `url` is by host name here,
    under a domain no DNS knows; test_a_server_in_a_sandbox_at_a_url reaches that one too)."""
    return f"{server.url}/preview/{preview.sandbox_id}/{preview.port}/"


def wait_up(url: str, headers: dict[str, str]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if httpx.get(url, headers=headers, timeout=10).status_code == 200:
            return
        time.sleep(0.1)
    raise AssertionError(f"{url} never answered")


@pytest.mark.parametrize("runtime", ["namespaces", "gvisor"])
def test_a_server_in_a_sandbox_at_a_url(server: Server, client: Client, runtime: str) -> None:
    require_runtime(runtime)
    sandbox = serving(client, runtime)
    try:
        preview = sandbox.expose(8000)
        assert isinstance(preview, Preview) and preview.url == f"http://8000-{sandbox.id}.{DOMAIN}/"
        url = at(server, preview)
        wait_up(url, dict(preview.headers))
        page = httpx.get(url, headers=preview.headers)
        assert page.text == "<h1>hello from the sandbox</h1>"

        data = os.urandom(3 << 20) * 4  # 12 MiB up, streamed through the agent
        upload = httpx.post(url + "upload", content=data, headers=preview.headers, timeout=60)
        assert upload.json() == {"length": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        with httpx.stream(
            "GET", url + "big?n=20000000", headers=preview.headers, timeout=60
        ) as big:
            assert sum(len(chunk) for chunk in big.iter_bytes()) == 20_000_000

        # Server-Sent Events arrive as they are sent: the second only after the client saw the first.
        with httpx.stream("GET", url + "events", headers=preview.headers, timeout=30) as events:
            lines = events.iter_lines()
            assert next(lines) == "data: one"
            sandbox.files.write("/tmp/go", "")
            assert [line for line in lines if line] == ["data: two"]

        # WebSockets: text and bytes both ways, a big message, and the server's close.
        echo = sandbox.expose(8765)
        socket_url = at(server, echo).replace("http://", "ws://")
        asyncio.run(_websocket_echo(socket_url, dict(echo.headers)))

        # By host name too, where the server has a preview domain.
        host = {"Host": f"8000-{sandbox.id}.{DOMAIN}", **preview.headers}
        assert httpx.get(f"{server.url}/echo", headers=host).json()["path"] == "/echo"
    finally:
        sandbox.terminate()


def test_the_token_link_sets_a_cookie_and_nothing_of_corrals_reaches_the_sandbox(
    server: Server, client: Client
) -> None:
    sandbox = serving(client, "namespaces")
    try:
        preview = sandbox.expose(8000)
        wait_up(at(server, preview), dict(preview.headers))
        assert preview.signed_url is not None and preview.token is not None
        with httpx.Client() as browser:
            first = browser.get(
                at(server, preview) + f"echo?a=1&corral_preview_token={preview.token}"
            )
            followed = browser.get(server.url + first.headers["location"])
        assert first.status_code == 303 and "corral_preview_token" not in first.headers["location"]
        assert (
            "HttpOnly" in first.headers["set-cookie"]
            and f"Path=/preview/{sandbox.id}/8000/" in first.headers["set-cookie"]
        )
        assert followed.status_code == 200  # the browser's cookie lets it in
        ours = f"corral_preview={preview.token}"
        seen = httpx.get(
            server.url + first.headers["location"],
            headers={"Authorization": f"Bearer {server.admin_key}", "Cookie": f"{ours}; theirs=1"},
        ).json()
        assert seen["query"] == "a=1"
        headers = {name.lower(): value for name, value in seen["headers"].items()}
        assert "authorization" not in headers and "x-corral-preview-token" not in headers
        assert headers.get("cookie", "") == "theirs=1"  # the app's own cookies pass, ours not
        assert headers["x-forwarded-prefix"] == f"/preview/{sandbox.id}/8000"
        exact = httpx.get(at(server, preview) + "echo?x=a%2Fb&flag", headers=preview.headers)
        assert exact.json()["query"] == "x=a%2Fb&flag"  # the query as the client sent it
        # The cookie is for this port of this sandbox only.
        other_port = httpx.get(f"{server.url}/preview/{sandbox.id}/8001/", headers={"Cookie": ours})
        assert other_port.status_code == 403
    finally:
        sandbox.terminate()


def test_refusals(server: Server, client: Client) -> None:
    sandbox = serving(client, "namespaces")
    other = Sandbox.create(runtime="namespaces", client=client)
    try:
        preview = sandbox.expose(8000)
        wait_up(at(server, preview), dict(preview.headers))
        assert httpx.get(at(server, preview)).status_code == 403  # no token
        wrong = httpx.get(
            at(server, preview), headers={"X-Corral-Preview-Token": "corral_pv_guess"}
        )
        assert wrong.status_code == 403 and "not valid" in wrong.text
        elsewhere = other.expose(8000)  # another sandbox's token
        assert httpx.get(at(server, preview), headers=elsewhere.headers).status_code == 403
        closed = sandbox.expose(9999)  # a port nothing listens on
        nothing = httpx.get(at(server, closed), headers=closed.headers)
        assert nothing.status_code == 502 and "Nothing answers on port 9999" in nothing.text
        assert (
            httpx.get(
                at(server, preview).replace("/8000/", "/9999/"), headers=preview.headers
            ).status_code
            == 403
        )
        gone = httpx.get(f"{server.url}/preview/sb-0000000000000000/8000/", headers=preview.headers)
        assert gone.status_code == 403

        brief = sandbox.expose(8000, ttl=1)
        assert httpx.get(at(server, brief), headers=brief.headers).status_code == 200
        time.sleep(6)  # past its ttl and the grants' cache
        assert httpx.get(at(server, brief), headers=brief.headers).status_code == 403
        preview.revoke()
        assert httpx.get(at(server, preview), headers=preview.headers).status_code == 403  # at once
        assert preview.id not in [p.id for p in sandbox.previews()]

        public = sandbox.expose(8000, public=True)
        assert httpx.get(at(server, public)).status_code == 200
        public.revoke()
        assert httpx.get(at(server, public)).status_code == 403

        api = {"Authorization": f"Bearer {server.admin_key}"}
        for body in (
            {"port": 0},
            {"port": "x"},
            {"port": 8000, "ttl": 0},
            {"port": 8000, "extra": 1},
        ):
            bad = httpx.post(
                f"{server.url}/v1/sandboxes/{sandbox.id}/previews", json=body, headers=api
            )
            assert bad.status_code == 400, body
        theirs = {"Authorization": f"Bearer {server.new_key('preview-other')}"}
        stolen = httpx.post(
            f"{server.url}/v1/sandboxes/{sandbox.id}/previews", json={"port": 8000}, headers=theirs
        )
        assert stolen.status_code == 404 and stolen.json()["error"]["code"] == "sandbox_not_found"
        revoke = httpx.delete(
            f"{server.url}/v1/sandboxes/{sandbox.id}/previews/{closed.id}", headers=theirs
        )
        assert revoke.status_code == 404
    finally:
        sandbox.terminate()
        other.terminate()
    ended = httpx.get(at(server, preview).replace(sandbox.id, other.id), headers=elsewhere.headers)
    assert ended.status_code == 404  # its sandbox has ended


async def _websocket_echo(url: str, headers: dict[str, str]) -> None:
    deadline = time.monotonic() + 30
    while True:  # the echo server may still be starting
        try:
            socket = await websockets.connect(url, additional_headers=headers, max_size=None)
            break
        except websockets.InvalidStatus:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    async with socket:
        await socket.send("hello")
        assert await socket.recv() == "hello"
        await socket.send(b"\x00\x01")
        assert await socket.recv() == b"\x00\x01"
        big = os.urandom(3 << 20)
        await socket.send(big)
        assert await socket.recv() == big
        await socket.send("close")
        with pytest.raises(websockets.ConnectionClosed):
            await socket.recv()
    # A Corral key offered as a subprotocol (as the web console's terminal does) is the
    # caller's: the sandbox's server sees the other subprotocols, not the key.
    offered = ["chat", "corral.key.corral_not_for_the_sandbox"]
    async with websockets.connect(url, additional_headers=headers, subprotocols=offered) as probe:  # type: ignore[arg-type]
        await probe.send("headers")
        seen = str(await probe.recv()).lower()
        assert "sec-websocket-protocol: chat" in seen and "not_for_the_sandbox" not in seen, seen
    with pytest.raises(websockets.InvalidStatus) as refused:  # no token
        await websockets.connect(url)
    assert refused.value.response.status_code == 403


@pytest.mark.parametrize("runtime", ["namespaces", "gvisor"])
def test_a_request_wakes_a_sleeping_sandbox(server: Server, client: Client, runtime: str) -> None:
    require_runtime(runtime)
    sandbox = serving(client, runtime)
    try:
        preview = sandbox.expose(8000)
        wait_up(at(server, preview), dict(preview.headers))
        (sandbox.hibernate if runtime == "gvisor" else sandbox.pause)()
        assert (
            httpx.get(at(server, preview) + "echo", headers=preview.headers, timeout=60).status_code
            == 200
        )
        assert sandbox.info().state.value == "running"
    finally:
        sandbox.terminate()


def test_the_cli_exposes_a_port(server: Server, client: Client) -> None:
    import subprocess
    import sys

    sandbox = serving(client, "namespaces")
    try:
        env = {**os.environ, "CORRAL_URL": server.url, "CORRAL_API_KEY": server.admin_key}
        done = subprocess.run(
            [sys.executable, "-m", "corral", "expose", sandbox.id, "8000", "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=True,
        )
        made = json.loads(done.stdout)
        assert made["url"] == f"http://8000-{sandbox.id}.{DOMAIN}/"
        wait_up(
            f"{server.url}/preview/{sandbox.id}/8000/", {"X-Corral-Preview-Token": made["token"]}
        )
        listed = subprocess.run(
            [sys.executable, "-m", "corral", "previews", sandbox.id, "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=True,
        )
        assert [p["id"] for p in json.loads(listed.stdout)] == [made["id"]]
    finally:
        sandbox.terminate()


def test_port_forward_carries_a_local_port_into_a_sandbox(server: Server, client: Client) -> None:
    import socket
    import subprocess
    import sys

    from tests.e2e.conftest import free_port

    sandbox = serving(client, "namespaces")
    local = free_port()
    env = {**os.environ, "CORRAL_URL": server.url, "CORRAL_API_KEY": server.admin_key}
    forward = subprocess.Popen(
        [sys.executable, "-m", "corral", "port-forward", sandbox.id, f"{local}:8000"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert forward.stdout is not None and b"forwarding" in forward.stdout.readline()
        wait_up(f"http://127.0.0.1:{local}/echo", {})
        assert httpx.get(f"http://127.0.0.1:{local}/echo?q=1").json()["query"] == "q=1"
        # Raw TCP, half-closed after the request: the answer still comes back.
        with socket.create_connection(("127.0.0.1", local)) as raw:
            raw.sendall(b"GET /echo HTTP/1.0\r\nHost: x\r\n\r\n")
            raw.shutdown(socket.SHUT_WR)
            answer = b"".join(iter(lambda: raw.recv(65536), b""))
        assert answer.split(b"\r\n")[0].endswith(b" 200 OK") and b'"path": "/echo"' in answer
    finally:
        forward.terminate()
        forward.wait(timeout=30)
        if forward.stdout is not None:
            forward.stdout.close()
        sandbox.terminate()


def test_a_browser_gets_in_with_the_token_link(server: Server, client: Client) -> None:
    """Headless Chromium opens the token link: the cookie it is given lets in the page, after
    the redirect that drops the token, and the page's own requests."""
    import shutil
    import subprocess
    import tempfile

    chromium = shutil.which("chromium")
    assert chromium, "install Debian's chromium (scripts/setup --dev does)"
    sandbox = serving(client, "namespaces")
    try:
        preview = sandbox.expose(8000)
        wait_up(at(server, preview), dict(preview.headers))
        link = at(server, preview) + f"page?corral_preview_token={preview.token}"
        with tempfile.TemporaryDirectory() as profile:
            argv = [chromium, "--headless", "--no-sandbox", "--disable-gpu"]
            argv += [f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom"]
            done = subprocess.run(
                [*argv, link], capture_output=True, text=True, timeout=120, check=False
            )
        assert '<p id="out">/echo</p>' in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    finally:
        sandbox.terminate()
