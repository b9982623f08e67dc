"""Cluster mode on a real local Ray cluster: `corral serve --cluster local:2` on this machine,
two nodes (each its own Corral server, data directory and host scope) behind one front.

Creates spread over the nodes and reach them directly (HTTP and WebSockets); a node selector
picks one; a node killed with SIGKILL is reported lost, its sandboxes end `node_lost`, the other
node keeps working and takes the new creates; nothing is left on the host afterwards."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from corral import Client, Sandbox
from corral.core.errors import ServiceUnavailable
from corral.engine import Engine, HostScope
from corral.host import cgroups
from corral.server.cluster.local import LocalRay
from corral.server.config import ServerConfig
from tests.conftest import require_runtime
from tests.e2e.conftest import SERVER_DIR, Server, start_server

NODES = 2


@pytest.fixture(scope="module")
def front(data_dir: Path) -> Iterator[Server]:
    require_runtime("namespaces")
    directory = SERVER_DIR.with_name(SERVER_DIR.name + "-cluster")
    running = start_server(
        directory, data_dir / "images", "--cluster", f"local:{NODES}", start_timeout=240
    )
    try:
        yield running
    finally:
        running.stop()
        asyncio.run(_end_leftovers(directory))


async def _end_leftovers(directory: Path) -> None:
    """A stopped node keeps its sandboxes for its next start, as any server does: end them."""
    key = ServerConfig(data_dir=directory).key_file
    for index in range(NODES):
        node = directory / "nodes" / f"n{index}"
        if node.is_dir():
            async with Engine(node, scope=HostScope(index), at_rest_key=key, boot_images=False):
                pass


def wait_until(check: Callable[[], bool], what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.2)


def scope_cgroups(index: int) -> list[str]:
    group = cgroups.ROOT / ("memory" if cgroups.layout() == "v1" else "") / f"corral-{index}"
    return [g.name for g in group.glob("sb-*")] if group.is_dir() else []


def test_creates_spread_over_the_nodes_and_reach_them_directly(front: Server) -> None:
    with front.client() as admin:
        nodes = admin.nodes()
    assert [(n.name, n.state, n.scope) for n in nodes] == [("n0", "ready", 0), ("n1", "ready", 1)]
    assert all("namespaces" in n.runtimes for n in nodes)
    # Ray's servers are out of reach: none listens in the host's network namespace.
    listening = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True)
    ray_servers = ('"raylet"', '"gcs_server"', '"ray::')
    assert not [
        line for line in listening.stdout.splitlines() if any(r in line for r in ray_servers)
    ]
    tenant = front.client(front.new_key("cluster-tenant"))
    made = [Sandbox.create(runtime="namespaces", client=tenant) for _ in range(4)]
    try:
        assert {s.info().node for s in made} == {"n0", "n1"}
        for sandbox in made:
            assert sandbox.run("echo via the front").stdout == "via the front\n"
            sandbox.files.write("/root/big.bin", io.BytesIO(b"x" * 2_000_000))
            assert len(sandbox.files.read("/root/big.bin")) == 2_000_000
            seen: list[bytes] = []
            streamed = sandbox.exec(cmd="echo one; echo two >&2; exit 3", on_stdout=seen.append)
            assert streamed.wait() == 3 and b"".join(seen) == b"one\n"
        listed = {s.id for s in Sandbox.list(client=tenant)}
        assert {s.id for s in made} <= listed
        # Metrics from every node: each sample labelled by its node (admin), and the key's
        # sandboxes' newest samples from both nodes.
        admin_auth = {"Authorization": f"Bearer {front.admin_key}"}
        scraped = httpx.get(f"{front.url}/metrics", headers=admin_auth, timeout=60)
        assert scraped.status_code == 200
        assert 'node="n0"' in scraped.text and 'node="n1"' in scraped.text
        usage = {row["sandbox_id"] for row in tenant.sandbox_usage()}
        assert {s.id for s in made} <= usage
        # Another key sees none of them, whichever node it asks.
        stranger = front.client(front.new_key("cluster-stranger"))
        assert not {s.id for s in Sandbox.list(client=stranger)} & listed
        with pytest.raises(Exception) as hidden:
            Sandbox.connect(made[0].id, client=stranger).run("true")
        assert getattr(hidden.value, "status_code", None) == 404
        stranger.close()
    finally:
        for sandbox in made:
            sandbox.terminate()
        tenant.close()


def test_a_restarted_cluster_takes_its_sandboxes_back(front: Server) -> None:
    """Stopping the front stops the nodes as any server stops: their sandboxes keep running
    (none is reported lost), and the next start adopts them, reached through the store."""
    key = front.new_key("cluster-restart")
    with front.client(key) as first:
        kept = [s for node in ("n0", "n1") for s in _on_node(front, key, first, node, 1)]
        kept[0].files.write("/root/kept.txt", "before")
    front.stop()
    front.start()
    with front.client(key) as tenant:
        for sandbox in kept:
            again = Sandbox.connect(sandbox.id, client=tenant)
            assert again.info().state.value == "running"
            assert again.run("echo back").stdout == "back\n"
        assert Sandbox.connect(kept[0].id, client=tenant).files.read_text("/root/kept.txt") == (
            "before"
        )
        for sandbox in kept:
            Sandbox.connect(sandbox.id, client=tenant).terminate()


def test_a_node_selector_picks_the_node_and_a_wrong_one_is_refused(front: Server) -> None:
    key = front.new_key("cluster-selector")
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=front.url, headers=auth, timeout=120) as http:
        made = http.post("/v1/sandboxes", json={"runtime": "namespaces", "node": "n1"})
        assert made.status_code == 201, made.text
        assert made.json()["node"] == "n1"
        http.delete(f"/v1/sandboxes/{made.json()['id']}")
        wrong = http.post("/v1/sandboxes", json={"runtime": "namespaces", "node": "n9"})
        assert wrong.status_code == 400
        assert wrong.json()["error"]["code"] == "node_not_found"
        assert "corral nodes list" in wrong.json()["error"]["message"]


def test_a_node_killed_with_sigkill_is_lost_and_its_sandboxes_end_node_lost(
    front: Server,
) -> None:
    key = front.new_key("cluster-loss")
    with front.client(key) as tenant, front.client() as admin:
        victims = _on_node(front, key, tenant, "n1", 2)
        (survivor,) = _on_node(front, key, tenant, "n0", 1)
        events = EventReader(front.url, key, {v.id for v in victims})
        LocalRay(front.data_dir / "cluster", NODES).kill_node(1)
        wait_until(lambda: {n.name: n.state for n in admin.nodes()}["n1"] == "lost", "n1 is lost")
        for victim in victims:
            ended = victim.info()
            assert ended.state.value == "terminated"
            assert ended.end_reason is not None and ended.end_reason.value == "node_lost"
            assert ended.end_detail and "n1" in ended.end_detail
        # The key's event stream at the front says so too (the node's own cannot).
        events.thread.join(timeout=60)
        assert events.lost == {v.id for v in victims}
        assert survivor.run("echo still here").stdout == "still here\n"
        after = Sandbox.create(runtime="namespaces", client=tenant)
        assert after.info().node == "n0"
        wait_until(lambda: scope_cgroups(1) == [], "n1's sandboxes are cleaned up")
        for sandbox in (survivor, after):
            sandbox.terminate()


class EventReader:
    """A key's event stream through the front, read on a thread until every one of `waited`
    has ended `node_lost`."""

    def __init__(self, url: str, key: str, waited: set[str]) -> None:
        self.lost: set[str] = set()
        self._waited = waited
        self._connected = threading.Event()
        self.thread = threading.Thread(target=self._read, args=(url, key), daemon=True)
        self.thread.start()
        assert self._connected.wait(30), "the event stream did not open"

    def _read(self, url: str, key: str) -> None:
        auth = {"Authorization": f"Bearer {key}"}
        with httpx.stream("GET", f"{url}/v1/events", headers=auth, timeout=120) as answer:
            for line in answer.iter_lines():
                self._connected.set()
                if line.startswith("data: "):
                    event = json.loads(line.removeprefix("data: "))
                    if event.get("end_reason") == "node_lost":
                        self.lost.add(event["sandbox_id"])
                if self.lost >= self._waited:
                    return


def _on_node(front: Server, key: str, client: Client, node: str, count: int) -> list[Sandbox]:
    """`count` sandboxes made on `node` by the selector (an HTTP field, not in the SDK)."""
    made = []
    for _ in range(count):
        answer = httpx.post(
            f"{front.url}/v1/sandboxes",
            json={"runtime": "namespaces", "node": node},
            headers={"Authorization": f"Bearer {key}"},
            timeout=120,
        )
        assert answer.status_code == 201, answer.text
        made.append(Sandbox.connect(answer.json()["id"], client=client))
    return made


def test_a_cluster_that_fails_to_start_leaves_nothing_behind(tmp_path: Path) -> None:
    """A `ray start` that fails after starting some servers (a node that times out, as seen
    under load) must not leave them, the namespace or the host's mount behind."""
    fake = tmp_path / "ray"
    fake.write_text(
        "#!/bin/sh\nsleep 300 >/dev/null 2>&1 &\necho 'The current node timed out' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    ray = LocalRay(tmp_path / "cluster", 1)
    ray.hostnet.parent.mkdir()
    ray._ray = str(fake)
    with pytest.raises(ServiceUnavailable, match="timed out") as raised:
        ray.start()
    assert raised.value.code == "cluster_unavailable"
    assert ray.processes() == []
    assert not Path(f"/run/netns/{ray.netns}").exists()
    assert str(ray.hostnet) not in Path("/proc/self/mountinfo").read_text()
    assert not ray.hostnet.exists()
