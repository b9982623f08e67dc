"""Tenancy, route by route: every route of the API, called with a second key on the first key's
sandbox, image, volume, snapshot and process, answers "not found", and changes nothing.

The walk goes over the app's own route table, so a new route fails this test until it is
classified below: either it names a tenant's resource (and must 404 for anyone else), or it is
node-wide, with the reason.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import re
import secrets
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute, APIWebSocketRoute
from starlette.routing import BaseRoute
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

import corral
from corral import Deployment, Image, Sandbox, Volume
from corral.server.app import create_app
from corral.server.config import ServerConfig
from tests.conftest import require_runtime
from tests.e2e.conftest import Server

# Node-wide routes: they name no tenant's resource.
NODE_WIDE = {
    ("GET", "/healthz"): "liveness, no key",
    ("GET", "/metrics"): "an admin's: the node's metrics",
    ("POST", "/v1/webhooks"): "registers a webhook of the caller's own",
    ("GET", "/ui"): "the web console's page, the same for all: it calls the API with a key",
    ("HEAD", "/ui"): "the web console's page, the same for all: it calls the API with a key",
    **{
        (method, path): "the schema"
        for method in ("GET", "HEAD")
        for path in ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")
    },
    ("PUT", "/v1/blobs/{digest}"): "an upload proves the key holds the content",
    ("HEAD", "/v1/blobs/{digest}"): "per key: see test_blobs_and_build_caches_are_per_key",
    ("POST", "/v1/images"): "builds an image of the caller's own",
    ("GET", "/v1/images/usage"): "the node's disk use",
    ("POST", "/v1/images/prune"): "an admin's: the node's storage",
    ("POST", "/v1/volumes"): "makes a volume of the caller's own (names are per key)",
    ("GET", "/v1/pools"): "the node's warm pools",
    ("PUT", "/v1/pools/{name}"): "an admin's: the node's warm pools",
    ("DELETE", "/v1/pools/{name}"): "an admin's: the node's warm pools",
    ("GET", "/v1/keys"): "an admin's: the node's keys",
    ("GET", "/v1/admin/sandboxes"): "an admin's: every key's sandboxes",
    ("GET", "/v1/nodes"): "an admin's: the machines that run sandboxes, counts only",
    ("POST", "/v1/nodes/{name}/drain"): "an admin's: a cluster's nodes (not_a_cluster here)",
    ("DELETE", "/v1/nodes/{name}/drain"): "an admin's: a cluster's nodes (not_a_cluster here)",
    ("GET", "/v1/snapshots/{snapshot_id}/archive"): "a cluster front's alone (403 for others)",
    ("PUT", "/v1/snapshots/{snapshot_id}/archive"): "a cluster front's alone (403 for others)",
    **{
        (method, "/v1/images/{image_id}/archive"): "a cluster front's alone (403 for others)"
        for method in ("HEAD", "GET", "PUT")
    },
    **{
        route: "a cluster front's alone (403 for others): a sandbox's memory moving"
        for route in (
            ("POST", "/v1/sandboxes/{sandbox_id}/hand-off"),
            ("DELETE", "/v1/sandboxes/{sandbox_id}/hand-off"),
            ("POST", "/v1/sandboxes/{sandbox_id}/hand-off/done"),
            ("POST", "/v1/sandboxes/{sandbox_id}/take-in"),
        )
    },
    ("DELETE", "/v1/admin/sandboxes/{sandbox_id}"): "an admin's: ends any sandbox",
    ("POST", "/v1/keys"): "an admin's: the node's keys",
    ("DELETE", "/v1/keys/{key_id}"): "an admin's: the node's keys",
    ("GET", "/v1/keys/{key_id}/quota"): "an admin's: the node's keys",
    ("PUT", "/v1/keys/{key_id}/quota"): "an admin's: the node's keys",
    ("GET", "/v1/keys/{key_id}/network"): "an admin's: the node's keys",
    ("GET", "/v1/audit"): "an admin reads every key's entries; a key its own (test_audit.py)",
    ("PUT", "/v1/keys/{key_id}/network"): "an admin's: the node's keys",
    **{
        (method, "/mcp"): "an MCP session of the caller's own: its tools call the API as the caller"
        for method in ("GET", "HEAD", "POST", "DELETE")
    },
}
# Lists and the event stream: the other key sees nothing of the owner's.
LISTS = {
    "/v1/sandboxes",
    "/v1/images",
    "/v1/volumes",
    "/v1/snapshots",
    "/v1/deployments",
    "/v1/webhooks",
    "/v1/metrics/sandboxes",
}
# What each resource route needs besides its path to get past validation to the tenant check.
BODIES: dict[str, Any] = {
    "/timeout": {"timeout": 60},
    "/network": {"allow": ["stolen.test"]},
    "/snapshot": {},
    "/fork": {"count": 1},
    "/move": {"node": "n1"},
    "/exec": {"cmd": "true"},
    "/code": {"code": "owned = 'stolen'"},
    "/code/contexts": {},
    "/previews": {"port": 8000},
    "/deploy": {"name": "stolen", "port": 8000, "command": "true"},
    "/v1/deployments/{name}": {"port": 8001},
    "/signal": {},
    "/filesystem-snapshot": {},
    "/files/mkdir": {"path": "/root/new"},
    "/files/rename": {"src": "/root/a", "dst": "/root/b"},
    "/files/chmod": {"path": "/root/a", "mode": 0o600},
}


def _routes(routes: list[BaseRoute]) -> Iterator[BaseRoute]:
    for route in routes:
        nested = getattr(route, "original_router", None)
        yield from _routes(nested.routes) if nested is not None else [route]


def every_route(tmp_path: Path) -> list[tuple[str, str]]:
    app = create_app(ServerConfig(data_dir=tmp_path))
    found = []
    for route in _routes(list(app.routes)):
        if isinstance(route, APIRoute):
            found += [(method, route.path) for method in sorted(route.methods)]
        elif isinstance(route, APIWebSocketRoute):
            found.append(("WEBSOCKET", route.path))
        else:
            found += [(m, route.path) for m in sorted(getattr(route, "methods", None) or ())]
    return found


@pytest.fixture(scope="module")
def owned(server: Server) -> Iterator[dict[str, str]]:
    """One of everything, owned by a fresh key: sandbox, process, volume, image, snapshot."""
    owner = server.client(server.new_key("owner"))
    made: dict[str, str] = {"key": owner._async.api_key or ""}
    sandbox = Sandbox.create(runtime="namespaces", pool=False, client=owner)
    sandbox.files.write("/root/a", "mine")
    sandbox.run_code("owned = 'mine'")  # its default code context, "python"
    made["sandbox"] = sandbox.id
    made["process"] = str(sandbox.exec("sleep", "600").id)
    made["preview"] = sandbox.expose(8000).id
    command = "python3 -m http.server 8000"
    made["deployment"] = Deployment.create(
        "owned-deployment", image="debian", command=command, port=8000, runtime="namespaces",
        client=owner,
    ).name  # fmt: skip
    made["volume"] = Volume.create("owned-volume", size_mb=16, client=owner).id
    made["webhook"] = owner.create_webhook("http://localhost:9/owned")["id"]
    made["image"] = Image.debian_slim().env({"OWNED": "1"}).build("owned-image", client=owner).id
    require_runtime("gvisor")
    sleeper = Sandbox.create(runtime="gvisor", pool=False, client=owner)
    made["snapshot"] = sleeper.snapshot(name="owned-snapshot").id
    sleeper.terminate()
    yield made
    Deployment.get(made["deployment"], client=owner).delete()
    sandbox.terminate()
    owner.close()


def test_every_route_hides_one_keys_resources_from_another(
    server: Server, owned: dict[str, str], tmp_path: Path
) -> None:
    other = {"Authorization": f"Bearer {server.admin_key}"}  # an admin, but not the owner
    unclassified, leaked = [], []
    with httpx.Client(base_url=server.url, headers=other, timeout=60) as http:
        for method, path in every_route(tmp_path):
            if (method, path) in NODE_WIDE:
                continue
            if method == "WEBSOCKET":
                status = asyncio.run(_websocket_status(server, path, owned, other))
                if status != 404:
                    leaked.append(f"{path}: answered {status}")
                continue
            if method == "GET" and path in LISTS:
                answer = http.get(path)
                kinds = ("sandbox", "volume", "image", "snapshot", "deployment", "webhook")
                mine = [owned[kind] for kind in kinds]
                if answer.status_code != 200 or any(v in answer.text for v in mine):
                    leaked.append(f"GET {path} shows the owner's: {answer.text[:300]}")
                continue
            requests = _requests(method, path, owned)
            if not requests:
                unclassified.append(f"{method} {path}")
            for url, params, body in requests:
                answer = http.request(method, url, params=params, **body)
                if answer.status_code != 404:
                    leaked.append(f"{method} {url}: {answer.status_code} {answer.text[:200]}")
    assert not unclassified, f"classify these routes in test_tenancy.py: {unclassified}"
    assert not leaked, "\n".join(leaked)
    # And nothing of the owner's moved.
    with server.client(owned["key"]) as owner:
        sandbox = Sandbox.connect(owned["sandbox"], client=owner)
        assert sandbox.info().state is corral.SandboxState.RUNNING
        assert sandbox.files.read_text("/root/a") == "mine"
        assert sandbox.run_code("owned").text == "'mine'"
        assert any(p.id == int(owned["process"]) and p.running for p in sandbox.processes())
        assert [p.id for p in sandbox.previews()] == [owned["preview"]]
        assert owner.get_snapshot("owned-snapshot").id == owned["snapshot"]
        assert owner.get_image("owned-image").id == owned["image"]
        assert Volume.from_name("owned-volume", client=owner).name == "owned-volume"
        deployed = Deployment.get(owned["deployment"], client=owner)
        assert (deployed.version, deployed.status) == (1, "running")
        assert [hook["id"] for hook in owner.list_webhooks()] == [owned["webhook"]]


def _requests(
    method: str, path: str, owned: dict[str, str]
) -> list[tuple[str, dict[str, str], dict[str, Any]]]:
    """The calls that try `path` on the owner's resources: (url, query, body)."""
    if path == "/v1/sandboxes" and method == "POST":  # a new sandbox made of the owner's things
        return [
            (path, {}, {"json": {"image": "owned-image"}}),
            (path, {}, {"json": {"image": owned["image"]}}),
            (path, {}, {"json": {"snapshot": "owned-snapshot"}}),
            (path, {}, {"json": {"volumes": [{"path": "/d", "volume": "owned-volume"}]}}),
        ]
    if path == "/v1/deployments" and method == "POST":  # a deployment of the owner's things
        given = {"name": "stolen", "command": "true", "port": 8000}
        return [
            (path, {}, {"json": {**given, "image": "owned-image"}}),
            (path, {}, {"json": {**given, "image": owned["image"]}}),
            (path, {}, {"json": {**given, "snapshot": "owned-snapshot"}}),
        ]
    if path == "/v1/events":
        return [(path, {"sandbox_id": owned["sandbox"]}, {})]
    if path == "/v1/audit/replay":  # the owner's sandbox, from the owner's snapshot
        replay = {"sandbox_id": owned["sandbox"], "snapshot": owned["snapshot"]}
        return [
            (path, {}, {"json": replay}),
            (path, {}, {"json": {**replay, "snapshot": "owned-snapshot"}}),
        ]
    names = {
        "sandbox_id": owned["sandbox"],
        "process_id": owned["process"],
        "context_id": "python",
        "preview_id": owned["preview"],
        "webhook_id": owned["webhook"],
        "name": owned["deployment"] if "/deployments/" in path else "?",
        "ref": owned[_kind_of(path)] if "{ref}" in path else "",
    }
    url = re.sub(r"\{(\w+)\}", lambda m: names.get(m.group(1), "?"), path)
    if "?" in url or url == path:
        return []
    body: dict[str, Any] = {}
    for suffix, json_body in BODIES.items():
        if path.endswith(suffix) and (method != "DELETE" or suffix != "/v1/deployments/{name}"):
            body = {"json": json_body}
    if method == "PUT" and "/files" in path:
        body = {"content": b"overwritten"}
    params = {"path": "/root/a"} if "/files" in path else {}
    calls = [(url, params, body)]
    if "{ref}" in path:  # by name as well as by id
        calls.append((path.replace("{ref}", f"owned-{_kind_of(path)}"), params, body))
    return calls


def _kind_of(path: str) -> str:
    return {"images": "image", "volumes": "volume", "snapshots": "snapshot"}[path.split("/")[2]]


async def _websocket_status(
    server: Server, path: str, owned: dict[str, str], headers: dict[str, str]
) -> int | None:
    """The HTTP status the WebSocket is refused with (None: it was accepted)."""
    path = path.replace("{sandbox_id}", owned["sandbox"]).replace("{port}", "8000")
    url = f"ws://127.0.0.1:{server.port}" + path
    try:
        async with connect(url, additional_headers=headers):
            return None
    except InvalidStatus as refused:
        return refused.response.status_code


def _build(server: Server, key: str, recipe: dict[str, Any]) -> list[dict[str, Any]]:
    """POST /v1/images as the SDK does; every event of the answer."""
    headers = {"Authorization": f"Bearer {key}"}
    answer = httpx.post(
        f"{server.url}/v1/images", json={"recipe": recipe}, headers=headers, timeout=600
    )
    if answer.status_code != 200:
        return [{"event": "refused", "status": answer.status_code, **answer.json()}]
    return [json.loads(line) for line in answer.text.splitlines() if line]


def test_blobs_and_build_caches_are_per_key(server: Server) -> None:
    """Another key can neither see nor use content it did not send, nor tell from `cached`
    what another key built; the host image is an admin's."""
    owner, other = server.new_key("blob-owner"), server.new_key("blob-other")
    packed = io.BytesIO()
    with tarfile.open(fileobj=packed, mode="w") as archive:  # a copy step's content: a tar
        data = secrets.token_bytes(2048)
        member = tarfile.TarInfo("data.bin")
        member.size = len(data)
        archive.addfile(member, io.BytesIO(data))
    content = packed.getvalue()
    blob = "sha256:" + hashlib.sha256(content).hexdigest()

    def http(key: str, method: str, **extra: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"}
        return httpx.request(
            method, f"{server.url}/v1/blobs/{blob}", headers=headers, timeout=60, **extra
        )

    assert http(owner, "PUT", content=content).status_code == 201
    assert http(owner, "HEAD").status_code == 200
    missing = http(other, "HEAD")
    assert missing.status_code == 404  # as if it were not on the node
    assert missing.headers["content-type"] == "application/json"  # as documented
    marker = secrets.token_hex(6)
    recipe = {
        "base": {"kind": "debian"},
        "steps": [
            {"kind": "run_commands", "commands": [f"echo {marker}"]},
            {"kind": "copy", "blob": blob, "dst": "/opt/data"},
        ],
    }
    refused = _build(server, other, recipe)
    assert refused[0]["status"] == 404 and refused[0]["error"]["code"] == "blob_not_found"
    assert "upload it first" in refused[0]["error"]["message"]
    first = _build(server, owner, recipe)
    assert first[-1]["event"] == "done", first[-1]
    assert not [e for e in first if e["event"] == "step" and e["step"] and e["cached"]]
    again = _build(server, owner, recipe)
    assert all(e["cached"] for e in again if e["event"] == "step")  # the owner's own cache
    # Sending the content proves holding it; the other key's build is its own, not cached.
    assert http(other, "PUT", content=content).status_code == 201
    assert http(other, "HEAD").status_code == 200
    theirs = _build(server, other, recipe)
    assert theirs[-1]["event"] == "done", theirs[-1]
    assert not [e for e in theirs if e["event"] == "step" and e["cached"]]
    assert theirs[-1]["image"]["id"] != first[-1]["image"]["id"]
    # The host image: refused to a tenant, as a sandbox's image and as a recipe's base.
    headers = {"Authorization": f"Bearer {other}"}
    made = httpx.post(
        f"{server.url}/v1/sandboxes", json={"image": "host"}, headers=headers, timeout=60
    )
    assert made.status_code == 403 and made.json()["error"]["code"] == "host_image_refused"
    hosted = _build(server, other, {"base": {"kind": "host"}, "steps": []})
    assert hosted[0]["status"] == 403
    with (
        server.client() as admin,
        Sandbox.create(image="host", runtime="namespaces", client=admin) as sandbox,
    ):
        assert sandbox.run("echo admin on host").stdout == "admin on host\n"
