"""Egress rules through the API, the SDK and the CLI: given at create (from a pool too),
read back, changed while running, refused when malformed, another key's sandbox untouched, and
each refused connection an event on the owner's stream. (What the rules enforce, against test
hosts under each runtime: tests/isolation/test_network_policy.py.)"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import corral
from corral import Client, Network, Sandbox
from tests import nethosts
from tests.conftest import require_runtime
from tests.e2e.conftest import SERVER_DIR, Server, start_server
from tests.nethosts import PROBE, RAW, WEB


@pytest.fixture(scope="module")
def server(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    require_runtime("namespaces")
    testnet = nethosts.test_network(tmp_path_factory.mktemp("testnet"))
    next(testnet)
    running = start_server(
        SERVER_DIR.with_name(SERVER_DIR.name + "-network"),
        data_dir / "images",
        "--dns-upstream", nethosts.HOST_SIDE,
        "--egress-deny", "*.floor.test",
    )  # fmt: skip
    try:
        yield running
    finally:
        running.stop_and_clean()
        next(testnet, None)


def probe(sandbox: Sandbox, *calls: list[Any]) -> list[dict[str, Any]]:
    sandbox.files.write("/tmp/probe.py", PROBE)
    result = sandbox.run(f"python3 /tmp/probe.py '{json.dumps(calls)}'", timeout=120)
    assert result.exit_code == 0, result.stderr
    outcomes: list[dict[str, Any]] = json.loads(result.stdout)
    return outcomes


def test_rules_given_read_changed_and_denials_streamed(server: Server, client: Client) -> None:
    rules = Network(allow=["web.test"])
    with Sandbox.create(runtime="namespaces", network=rules, client=client) as sandbox:
        assert sandbox.network == Network(allow=("web.test",), deny=())
        assert sandbox.info().spec.egress is not None

        async def first_denial() -> dict[str, Any]:
            async with corral.AsyncClient(url=server.url, api_key=server.admin_key) as aio:
                async for event in aio.events(sandbox.id):
                    if event["type"] == "sandbox.egress_denied":
                        return event
            raise AssertionError("the stream ended")

        async def watch_and_probe() -> tuple[dict[str, Any], list[dict[str, Any]]]:
            watcher = asyncio.ensure_future(first_denial())
            await asyncio.sleep(0.5)  # subscribed before the denial happens
            outcomes = await asyncio.to_thread(
                probe, sandbox, ["http", WEB, "web.test"], ["http", WEB, "alias.test"]
            )
            return await asyncio.wait_for(watcher, 30), outcomes

        event, (allowed, refused) = asyncio.run(watch_and_probe())
        assert allowed["ok"] == f"host=web.test at={WEB}"
        assert "error" in refused
        assert event["destination"] == "alias.test" and event["port"] == 80
        assert event["reason"] == "denied_by_policy" and event["rule"] == "not in the allow list"

        changed = sandbox.set_network(Network(allow=["alias.test"]))
        assert changed.spec.egress is not None and sandbox.network == Network(allow=["alias.test"])
        allowed, refused = probe(sandbox, ["http", WEB, "alias.test"], ["http", WEB, "web.test"])
        assert allowed["ok"] == f"host=alias.test at={WEB}" and "error" in refused

        sandbox.set_network(Network())  # its own rules gone; the operator's floor stays
        assert sandbox.network == Network()
        web, floor = probe(sandbox, ["http", WEB, "web.test"], ["resolve", "x.floor.test"])
        assert web["ok"] == f"host=web.test at={WEB}" and "error" in floor


def test_a_pooled_sandbox_takes_the_rules_of_the_create(server: Server, client: Client) -> None:
    headers = {"Authorization": f"Bearer {server.admin_key}"}
    template = {"runtime": "namespaces", "network": "internet", "size": 1}
    made = httpx.put(f"{server.url}/v1/pools/net", json=template, headers=headers, timeout=60)
    assert made.status_code == 200, made.text
    try:
        for _ in range(300):
            if client.list_pools()[0]["idle"] == 1:
                break
            time.sleep(0.2)
        rules = Network(allow=["web.test"])
        with Sandbox.create(runtime="namespaces", network=rules, client=client) as sandbox:
            assert client.list_pools()[0]["hits"] == 1  # it came from the pool
            allowed, refused = probe(
                sandbox, ["http", WEB, "web.test"], ["http", WEB, "alias.test"]
            )
            assert allowed["ok"] == f"host=web.test at={WEB}" and "error" in refused
    finally:
        httpx.delete(f"{server.url}/v1/pools/net", headers=headers, timeout=60)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"network": "internet", "egress": {"allow": ["not a name"]}}, "invalid_network_rule"),
        ({"network": "internet", "egress": {"allow": ["2001:db8::/32"]}}, "invalid_network_rule"),
        ({"network": "internet", "egress": {"deny": ["*"]}}, "invalid_network_rule"),
        ({"network": "internet", "egress": {"deny": ["x.test"] * 257}}, "invalid_network_rule"),
        ({"egress": {"allow": ["pypi.org"]}}, "invalid_network_rule"),  # no internet
        ({"network": "internet", "egress": {"allow": "pypi.org"}}, "invalid_request"),
        ({"network": "internet", "egress": {"block": []}}, "invalid_request"),
    ],
)
def test_malformed_rules_are_refused_at_create(
    server: Server, body: dict[str, Any], code: str
) -> None:
    headers = {"Authorization": f"Bearer {server.admin_key}"}
    body = {"runtime": "namespaces", **body}
    response = httpx.post(f"{server.url}/v1/sandboxes", json=body, headers=headers, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    listed = httpx.get(f"{server.url}/v1/sandboxes", headers=headers, timeout=60).json()
    assert [s for s in listed if s["state"] != "terminated"] == []  # nothing was made


def test_rules_of_a_running_sandbox_checked_and_kept_to_its_owner(
    server: Server, client: Client
) -> None:
    owner = server.admin_key
    other = server.new_key("network-other")
    with Sandbox.create(runtime="namespaces", network="internet", client=client) as sb:
        url = f"{server.url}/v1/sandboxes/{sb.id}/network"
        mine = {"Authorization": f"Bearer {owner}"}
        bad = httpx.put(url, json={"allow": ["bad rule"]}, headers=mine, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_network_rule"
        theirs = httpx.put(url, json={"allow": []}, headers={"Authorization": f"Bearer {other}"},
                           timeout=30)  # fmt: skip
        assert theirs.status_code == 404
        assert sb.info().spec.egress is None  # neither changed anything
        done = httpx.put(url, json={"allow": [], "deny": []}, headers=mine, timeout=30)
        assert done.status_code == 200 and done.json()["spec"]["egress"]["allow"] == []
        (web,) = probe(sb, ["http", WEB, "web.test"])
        assert "error" in web  # allow nothing: nothing
    with Sandbox.create(runtime="namespaces", client=client) as offline:
        url = f"{server.url}/v1/sandboxes/{offline.id}/network"
        refused = httpx.put(url, json={"allow": ["web.test"]}, headers=mine, timeout=30)
        assert refused.status_code == 400
        assert "internet" in refused.json()["error"]["message"]


def test_the_cli_gives_shows_and_changes_rules(server: Server) -> None:
    env = {**os.environ, "CORRAL_URL": server.url, "CORRAL_API_KEY": server.admin_key}

    def corral(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "corral", *args], capture_output=True,
                              text=True, timeout=300, check=False, env=env)  # fmt: skip

    made = corral("sandbox", "create", "--runtime", "namespaces", "--allow", "web.test",
                  "--deny", RAW)  # fmt: skip
    assert made.returncode == 0, made.stderr
    sandbox_id = made.stdout.strip()
    try:
        shown = corral("sandbox", "network", sandbox_id)
        assert shown.stdout.strip() == f"internet; allow web.test; deny {RAW}/32", shown.stderr
        changed = corral("sandbox", "network", sandbox_id, "--allow", "*.test")
        assert changed.stdout.strip() == "internet; allow *.test", changed.stderr
        info = corral("sandbox", "info", sandbox_id)
        assert "allow *.test" in info.stdout
        cleared = corral("sandbox", "network", sandbox_id, "--clear")
        assert cleared.stdout.strip() == "internet"
        bad = corral("sandbox", "network", sandbox_id, "--allow", "not a rule")
        assert bad.returncode != 0 and "not a rule" in bad.stderr
    finally:
        corral("sandbox", "kill", sandbox_id)


def test_a_keys_default_rules_apply_when_a_create_gives_none(server: Server) -> None:
    admin = {"Authorization": f"Bearer {server.admin_key}"}
    tenant = server.new_key("network-default")
    key_id = next(k["id"] for k in httpx.get(f"{server.url}/v1/keys", headers=admin).json()
                  if k["name"] == "network-default")  # fmt: skip
    url = f"{server.url}/v1/keys/{key_id}/network"
    assert httpx.get(url, headers=admin).json() == {"key_id": key_id, "egress": None}
    bad = httpx.put(url, json={"allow": ["not a rule"]}, headers=admin)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_network_rule"
    as_tenant = httpx.put(url, json={"allow": []}, headers={"Authorization": f"Bearer {tenant}"})
    assert as_tenant.status_code == 403  # admins only
    set_ = httpx.put(url, json={"allow": ["web.test"]}, headers=admin)
    assert set_.json()["egress"] == {"allow": ["web.test"], "deny": []}
    with corral.Client(url=server.url, api_key=tenant) as client:
        with Sandbox.create(runtime="namespaces", network="internet", client=client) as sandbox:
            assert sandbox.network == Network(allow=["web.test"])
            allowed, refused = probe(
                sandbox, ["http", WEB, "web.test"], ["http", WEB, "alias.test"]
            )
            assert allowed["ok"] == f"host=web.test at={WEB}" and "error" in refused
        own = Network(allow=["alias.test"])  # its own rules replace the key's
        with Sandbox.create(runtime="namespaces", network=own, client=client) as sandbox:
            assert sandbox.network == own
    cleared = httpx.put(url, content=b"null", headers={**admin, "Content-Type": "application/json"})
    assert cleared.json()["egress"] is None
