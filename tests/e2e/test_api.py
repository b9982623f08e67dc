"""The HTTP API as any client sees it: auth, tenants, and a clear error for every bad input."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
import websockets
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

import corral
from corral import Sandbox
from tests.e2e.conftest import Server


@pytest.fixture
def http(server: Server) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {server.admin_key}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as made:
        yield made


@pytest.fixture
def sandbox_id(http: httpx.Client) -> Iterator[str]:
    response = http.post("/v1/sandboxes", json={"runtime": "namespaces"})
    assert response.status_code == 201, response.text
    made = str(response.json()["id"])
    yield made
    http.delete(f"/v1/sandboxes/{made}")


def error_of(response: httpx.Response, status: int) -> str:
    """The error code, after checking the status and the error's shape."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert "Traceback" not in body["error"]["message"]
    return str(body["error"]["code"])


def test_health_and_openapi_need_no_key(server: Server) -> None:
    health = httpx.get(f"{server.url}/healthz").json()
    assert health["status"] == "ok" and "namespaces" in health["runtimes"]
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert "/v1/sandboxes/{sandbox_id}/exec" in spec["paths"]


def test_an_idle_connection_outlives_the_clients_keep_alive(server: Server) -> None:
    """The server keeps an idle connection open past the 5 s clients keep theirs, so none
    sends a request on a connection the server is closing at that moment (a burst of gVisor
    creates lost commands to that race: ReadError)."""
    where = urlsplit(server.url)
    request = f"GET /healthz HTTP/1.1\r\nHost: {where.netloc}\r\n\r\n".encode()
    with socket.create_connection((where.hostname, where.port), timeout=30) as conn:
        for pause in (0, 6):
            time.sleep(pause)
            conn.sendall(request)
            answer = b""
            while b'"status"' not in answer and (chunk := conn.recv(65536)):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200"), (pause, answer)


def test_every_call_needs_a_valid_key(server: Server) -> None:
    url = f"{server.url}/v1/sandboxes"
    assert error_of(httpx.get(url), 401) == "unauthorized"
    assert error_of(httpx.get(url, headers={"Authorization": "Basic abc"}), 401) == "unauthorized"
    wrong = {"Authorization": "Bearer corral_wrong"}
    assert error_of(httpx.get(url, headers=wrong), 401) == "unauthorized"


def test_revoked_key_stops_working(server: Server) -> None:
    secret = server.new_key("short-lived")
    headers = {"Authorization": f"Bearer {secret}"}
    assert httpx.get(f"{server.url}/v1/sandboxes", headers=headers).status_code == 200
    admin = {"Authorization": f"Bearer {server.admin_key}"}
    keys = httpx.get(f"{server.url}/v1/keys", headers=admin).json()
    key_id = next(k["id"] for k in keys if k["name"] == "short-lived")
    assert httpx.delete(f"{server.url}/v1/keys/{key_id}", headers=admin).status_code == 200
    assert error_of(httpx.get(f"{server.url}/v1/sandboxes", headers=headers), 401) == "unauthorized"
    # Only admin keys manage keys.
    other = {"Authorization": f"Bearer {server.new_key('plain')}"}
    assert error_of(httpx.get(f"{server.url}/v1/keys", headers=other), 403) == "admin_required"


def test_a_key_never_sees_another_keys_sandboxes(server: Server, sandbox_id: str) -> None:
    stranger = {"Authorization": f"Bearer {server.new_key('stranger')}"}
    with httpx.Client(base_url=server.url, headers=stranger) as other:
        for method, path, body in [
            ("GET", f"/v1/sandboxes/{sandbox_id}", None),
            ("DELETE", f"/v1/sandboxes/{sandbox_id}", None),
            ("POST", f"/v1/sandboxes/{sandbox_id}/exec", {"cmd": "true"}),
            ("POST", f"/v1/sandboxes/{sandbox_id}/timeout", {"timeout": 60}),
            ("GET", f"/v1/sandboxes/{sandbox_id}/files/content?path=/etc/hostname", None),
            ("GET", f"/v1/sandboxes/{sandbox_id}/processes", None),
        ]:
            response = other.request(method, path, json=body)
            assert error_of(response, 404) == "sandbox_not_found", (method, path)
        assert other.get("/v1/sandboxes").json() == []
    with (
        server.client(stranger["Authorization"].split()[1]) as sdk,
        pytest.raises(corral.SandboxNotFound),
    ):
        Sandbox.connect(sandbox_id, client=sdk)
    # ... and the owner's sandbox is untouched.
    with server.client() as sdk:
        assert Sandbox.connect(sandbox_id, client=sdk).run("echo alive").stdout == "alive\n"


def test_bad_bodies_get_clear_errors(server: Server, http: httpx.Client) -> None:
    before = sorted((server.data_dir / "sandboxes").iterdir())
    malformed = http.post(
        "/v1/sandboxes", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert error_of(malformed, 400) == "invalid_json"
    unknown = http.post("/v1/sandboxes", json={"memroy_mb": 256})
    assert error_of(unknown, 400) == "invalid_request"
    assert "memroy_mb" in unknown.json()["error"]["message"]
    wrong_type = http.post("/v1/sandboxes", json={"memory_mb": "lots"})
    assert error_of(wrong_type, 400) == "invalid_request"
    out_of_range = http.post("/v1/sandboxes", json={"memory_mb": 1, "runtime": "namespaces"})
    assert error_of(out_of_range, 400) == "invalid_request"
    assert "memory_mb" in out_of_range.json()["error"]["message"]
    assert error_of(http.post("/v1/sandboxes", json={"runtime": "nope"}), 422) == "unknown_runtime"
    huge = http.post("/v1/sandboxes", json={"env": {"A": "x" * (2 << 20)}})
    assert error_of(huge, 413) == "payload_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"env": {"A": "'
        for _ in range(3):
            yield b"x" * (1 << 20)
        yield b'"}}'

    streamed = http.post(
        "/v1/sandboxes", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert error_of(streamed, 413) == "payload_too_large"
    # A body the server refuses from its head, too large for the machine's socket buffers to
    # hide that it is never read: the server reads and drops it, so the answer is not lost to
    # a reset (`EarlyAnswers`); the SDK asks first (`Expect: 100-continue`), at any size.
    large = json.dumps({"env": {"A": "x" * (16 << 20)}}).encode()
    refused = http.post(
        "/v1/sandboxes", content=large, headers={"Content-Type": "application/json"}
    )
    assert error_of(refused, 413) == "payload_too_large"
    upload = http.put(
        "/v1/sandboxes/sb-nothinghere00000/files/content",
        params={"path": "/root/big.bin"},
        content=bytes(16 << 20),
    )
    assert error_of(upload, 404) == "sandbox_not_found"
    with server.client() as sdk, pytest.raises(corral.PayloadTooLarge):
        Sandbox.create(runtime="namespaces", env={"A": "x" * (80 << 20)}, client=sdk)
    assert error_of(http.get("/v1/nothing-here"), 404) == "not_found"
    assert error_of(http.put("/v1/sandboxes"), 405) == "method_not_allowed"
    # None of it left a sandbox, or a sandbox's directory, behind.
    assert http.get("/v1/sandboxes", params={"state": "running"}).json() == []
    assert sorted((server.data_dir / "sandboxes").iterdir()) == before


def test_bad_ids_and_paths(http: httpx.Client, sandbox_id: str) -> None:
    assert error_of(http.get("/v1/sandboxes/nonsense"), 400) == "invalid_id"
    assert error_of(http.get("/v1/sandboxes/sb-0000000000000000"), 404) == "sandbox_not_found"
    base = f"/v1/sandboxes/{sandbox_id}"
    assert (
        error_of(http.get(f"{base}/files/content", params={"path": "rel"}), 400) == "invalid_path"
    )
    missing = http.get(f"{base}/files/content", params={"path": "/nope"})
    assert error_of(missing, 404) == "file_not_found"
    assert error_of(http.post(f"{base}/exec", json={}), 400) == "invalid_request"
    assert (
        error_of(http.post(f"{base}/exec", json={"cmd": "true", "cwd": "x"}), 400) == "invalid_path"
    )
    assert error_of(http.post(f"{base}/timeout", json={"timeout": 10**9}), 400) == "invalid_request"
    assert (
        error_of(http.get("/v1/sandboxes", params={"state": "dancing"}), 400) == "invalid_request"
    )


def test_exec_in_a_terminated_sandbox(http: httpx.Client, sandbox_id: str) -> None:
    assert http.delete(f"/v1/sandboxes/{sandbox_id}").json()["state"] == "terminated"
    response = http.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": "true"})
    assert error_of(response, 409) == "invalid_state"
    assert "terminated" in response.json()["error"]["message"]
    # Terminating again is a no-op that still answers.
    assert http.delete(f"/v1/sandboxes/{sandbox_id}").status_code == 200


async def test_concurrent_terminate_and_exec(server: Server) -> None:
    headers = {"Authorization": f"Bearer {server.admin_key}"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60) as http:
        made = await http.post("/v1/sandboxes", json={"runtime": "namespaces"})
        sandbox_id = made.json()["id"]
        runs = [
            http.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": "sleep 0.2; echo hi"})
            for _ in range(6)
        ]
        answers = await asyncio.gather(*runs, http.delete(f"/v1/sandboxes/{sandbox_id}"))
        for answer in answers[:-1]:
            if answer.status_code != 200:  # finished first, or refused or cut off cleanly
                assert error_of(answer, answer.status_code) in {"invalid_state", "sandbox_ended"}
        assert answers[-1].json()["state"] == "terminated"
        info = (await http.get(f"/v1/sandboxes/{sandbox_id}")).json()
        assert info["end_reason"] == "terminated_by_user"


async def test_client_that_disconnects_mid_stream(server: Server, sandbox_id: str) -> None:
    headers = {"Authorization": f"Bearer {server.admin_key}"}
    url = f"ws://127.0.0.1:{server.port}/v1/sandboxes/{sandbox_id}/exec/stream"
    async with connect(url, additional_headers=headers) as ws:
        await ws.send(json.dumps({"cmd": "yes"}))
        started = json.loads(await ws.recv())
        assert started["type"] == "started"
        await ws.recv()  # output flows; now hang up without reading the rest
    with server.client() as sdk:
        sandbox = Sandbox.connect(sandbox_id, client=sdk)
        for _ in range(100):  # the server kills the orphaned process (hang bound only)
            states = {p.id: p.running for p in sandbox.processes()}
            if not states.get(started["id"], False):
                break
            await asyncio.sleep(0.1)
        assert states[started["id"]] is False
        # A download abandoned half-way leaves the sandbox usable.
        sandbox.run("head -c 50000000 /dev/zero > /root/big")
    async with (
        httpx.AsyncClient(base_url=server.url, headers=headers) as http,
        http.stream(
            "GET", f"/v1/sandboxes/{sandbox_id}/files/content", params={"path": "/root/big"}
        ) as response,
    ):
        async for _ in response.aiter_bytes():
            break
    with server.client() as sdk:
        assert Sandbox.connect(sandbox_id, client=sdk).run("echo still").stdout == "still\n"


async def test_client_that_leaves_a_silent_process(server: Server, sandbox_id: str) -> None:
    """A process that prints nothing is killed too when its client hangs up."""
    headers = {"Authorization": f"Bearer {server.admin_key}"}
    url = f"ws://127.0.0.1:{server.port}/v1/sandboxes/{sandbox_id}/exec/stream"
    async with connect(url, additional_headers=headers) as ws:
        await ws.send(json.dumps({"argv": ["sleep", "600"]}))
        started = json.loads(await ws.recv())
    with server.client() as sdk:
        sandbox = Sandbox.connect(sandbox_id, client=sdk)
        for _ in range(100):  # hang bound only
            states = {p.id: p.running for p in sandbox.processes()}
            if not states.get(started["id"], False):
                break
            await asyncio.sleep(0.1)
        assert states[started["id"]] is False


async def test_websocket_errors_are_json_too(server: Server, sandbox_id: str) -> None:
    """Unauthenticated or not the caller's: refused before a socket is accepted, with the HTTP
    status and JSON a request would get. Later errors come as messages."""
    url = f"ws://127.0.0.1:{server.port}/v1/sandboxes/{sandbox_id}/exec/stream"
    for headers, status, code in (
        ({}, 401, "unauthorized"),
        ({"Authorization": "Bearer corral_wrong"}, 401, "unauthorized"),
        ({"Authorization": f"Bearer {server.new_key('ws-stranger')}"}, 404, "sandbox_not_found"),
    ):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url, additional_headers=headers):
                pass
        answer = refused.value.response
        assert answer.status_code == status
        assert json.loads(bytes(answer.body or b""))["error"]["code"] == code
    stranger = corral.AsyncClient(url=server.url, api_key=server.new_key("sdk-stranger"))
    try:
        with pytest.raises(corral.SandboxNotFound):  # the SDK turns the refusal into its error
            await stranger.websocket(f"/v1/sandboxes/{sandbox_id}/exec/stream")
    finally:
        await stranger.aclose()
    headers = {"Authorization": f"Bearer {server.admin_key}"}
    async with connect(url, additional_headers=headers) as ws:
        await ws.send(json.dumps({"cmd": "true", "bogus": 1}))
        message = json.loads(await ws.recv())
        assert (
            message["error"]["code"] == "invalid_request" and "bogus" in message["error"]["message"]
        )


def test_interrupted_upload_leaves_no_file(http: httpx.Client, sandbox_id: str) -> None:
    def broken() -> Iterator[bytes]:
        yield b"x" * 100_000
        raise ConnectionError("client died")

    with pytest.raises(ConnectionError):
        http.put(
            f"/v1/sandboxes/{sandbox_id}/files/content",
            params={"path": "/root/partial"},
            content=broken(),
        )
    stat = http.get(f"/v1/sandboxes/{sandbox_id}/files/stat", params={"path": "/root/partial"})
    assert error_of(stat, 404) == "file_not_found"


async def test_a_browser_websocket_offers_its_key_as_a_subprotocol(server: Server) -> None:
    """Browsers cannot set headers on a WebSocket (the web console's terminal): the key may
    come as a subprotocol, `corral.key.<key>`, beside `corral`, which the server accepts."""
    admin = {"Authorization": f"Bearer {server.admin_key}"}
    async with httpx.AsyncClient(base_url=server.url, headers=admin, timeout=60) as http:
        created = (await http.post("/v1/sandboxes", json={"runtime": "namespaces"})).json()
        url = f"ws{server.url.removeprefix('http')}/v1/sandboxes/{created['id']}/exec/stream"
        try:
            offered = ["corral", f"corral.key.{server.admin_key}"]
            async with websockets.connect(url, subprotocols=offered) as socket:  # type: ignore[arg-type]
                assert socket.subprotocol == "corral"
                await socket.send(json.dumps({"argv": ["echo", "over a subprotocol"]}))
                messages = [await asyncio.wait_for(socket.recv(), 30) for _ in range(3)]
                assert b"\x01over a subprotocol\n" in messages
            for wrong in (["corral", "corral.key.corral_wrong"], ["corral"]):
                with pytest.raises(websockets.InvalidStatus) as denied:
                    await websockets.connect(url, subprotocols=wrong)  # type: ignore[arg-type]
                assert denied.value.response.status_code == 401
        finally:
            await http.delete(f"/v1/sandboxes/{created['id']}")
