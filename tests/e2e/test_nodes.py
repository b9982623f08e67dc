"""The nodes: the machines whose engines run sandboxes, as an operator lists them (admin key),
and the node each sandbox's info names. One server, named and scoped as a node of a local
cluster would be."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from corral import CorralError, NodeInfo, Sandbox
from corral.server.config import ServerConfig
from tests.conftest import require_runtime
from tests.e2e.conftest import SERVER_DIR, Server, start_server
from tests.e2e.test_cli import corral

NAME = "node-a.test"
SCOPE = 5


@pytest.fixture(scope="module")
def node(data_dir: Path) -> Iterator[Server]:
    require_runtime("namespaces")
    running = start_server(
        SERVER_DIR.with_name(SERVER_DIR.name + "-node"),
        data_dir / "images",
        "--node-name",
        NAME,
        "--host-scope",
        str(SCOPE),
        "--pool",
        "namespaces:default:1",
    )
    try:
        yield running
    finally:
        running.stop_and_clean()
        subprocess.run(["nft", "delete", "table", "inet", f"corral_{SCOPE}"], check=False)


def only_node(server: Server) -> NodeInfo:
    with server.client() as admin:
        nodes = admin.nodes()
    assert [n.name for n in nodes] == [NAME]
    return nodes[0]


def test_an_admin_lists_the_node_with_its_capacity_load_and_pools(node: Server) -> None:
    before = only_node(node)
    assert before.state == "ready" and before.scope == SCOPE
    assert "namespaces" in before.runtimes
    assert before.capacity["cpu"] > 0 and before.capacity["memory_mb"] > 0
    assert before.max_sandboxes == 2000 and before.memory_available_mb > 0
    assert [(p["name"], p["size"]) for p in before.pools] == [("namespaces-debian", 1)]
    tenant = node.client(node.new_key("nodes-tenant"))
    sandbox = Sandbox.create(runtime="namespaces", cpu=0.25, pool=False, client=tenant)
    try:
        assert sandbox.info().node == NAME
        during = only_node(node)
        assert during.sandboxes >= before.sandboxes + 1
        assert during.allocated["cpu"] >= before.allocated["cpu"] + 0.25
    finally:
        sandbox.terminate()
    # The store keeps the node of an ended sandbox too.
    ended = [s for s in Sandbox.list(state="terminated", client=tenant) if s.id == sandbox.id]
    assert [s.node for s in ended] == [NAME]
    tenant.close()


def test_a_tenant_may_not_list_the_nodes(node: Server) -> None:
    tenant = node.client(node.new_key("nodes-stranger"))
    with pytest.raises(CorralError) as refused:
        tenant.nodes()
    assert refused.value.status_code == 403
    tenant.close()


def test_a_server_on_its_own_has_no_nodes_to_drain(node: Server) -> None:
    with node.client() as admin, pytest.raises(CorralError) as refused:
        admin.drain_node(NAME)
    assert refused.value.status_code == 400 and refused.value.code == "not_a_cluster"
    tenant = node.client(node.new_key("nodes-drainer"))
    with pytest.raises(CorralError) as forbidden:
        tenant.drain_node(NAME, draining=False)
    assert forbidden.value.status_code == 403
    tenant.close()
    drained = corral(node, "nodes", "drain", NAME)
    assert drained.returncode != 0 and "not a cluster" in drained.stderr + drained.stdout


def test_a_server_on_its_own_moves_no_sandbox_and_hands_none_off(node: Server) -> None:
    """A move is a cluster's (its front's); the nodes' side of it is the front's key's alone:
    a checkpoint holds the sandbox's memory, which not even an admin may take."""
    key = node.new_key("nodes-mover")
    tenant = node.client(key)
    sandbox = Sandbox.create(runtime="namespaces", pool=False, client=tenant)
    mine = {"Authorization": f"Bearer {key}"}
    admin = {"Authorization": f"Bearer {node.admin_key}"}
    base = f"/v1/sandboxes/{sandbox.id}"
    try:
        with httpx.Client(base_url=node.url, timeout=60) as http:
            moved = http.post(f"{base}/move", json={"node": "n1"}, headers=mine)
            assert moved.status_code == 400 and moved.json()["error"]["code"] == "not_a_cluster"
            assert "snapshot it" in moved.json()["error"]["message"]
            with pytest.raises(CorralError) as not_here:
                sandbox.move()
            assert not_here.value.code == "not_a_cluster"
            theirs = http.post(f"{base}/move", json={}, headers=admin)  # not the admin's
            assert theirs.status_code == 404
            for method, path, body in (
                ("POST", f"{base}/hand-off", {"to": "n1"}),
                ("DELETE", f"{base}/hand-off", None),
                ("POST", f"{base}/hand-off/done", None),
                ("POST", f"{base}/take-in", {"snapshot": "sn-0"}),
            ):
                for who, code in ((mine, "admin_required"), (admin, "cluster_front_only")):
                    answer = http.request(method, path, json=body, headers=who)
                    assert answer.status_code == 403, (method, path, answer.text)
                    assert answer.json()["error"]["code"] == code
        assert sandbox.info().state.value == "running"  # and nothing happened to it
    finally:
        sandbox.terminate()
        tenant.close()


def test_corral_nodes_list_as_a_table_and_as_json(node: Server) -> None:
    listed = corral(node, "nodes", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    (described,) = json.loads(listed.stdout)
    assert described["name"] == NAME and described["scope"] == SCOPE
    assert set(described["capacity"]) == {"cpu", "memory_mb", "disk_mb"}
    table = corral(node, "nodes", "list")
    assert table.returncode == 0, table.stderr
    assert NAME in table.stdout and "namespaces" in table.stdout
    answer = httpx.get(f"{node.url}/v1/nodes", headers={"Authorization": "Bearer wrong"})
    assert answer.status_code == 401


def test_a_node_name_that_is_not_a_name_is_refused() -> None:
    for wrong in ("", "-a", "a b", "x" * 65, "a/b"):
        with pytest.raises(CorralError) as refused:
            ServerConfig(data_dir=Path("/nonexistent"), node_name=wrong)
        assert refused.value.code == "invalid_node_name"
        assert "--node-name" in str(refused.value)
