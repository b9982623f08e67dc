"""Cluster mode on a real local Ray cluster: `corral serve --cluster local:2` on this machine,
two nodes (each its own Corral server, data directory and host scope) behind one front, with
the store in SQLite and again in PostgreSQL.

Creates spread over the nodes and reach them directly (HTTP and WebSockets); a node selector
picks one; a node killed with SIGKILL while creates are in flight is reported lost, its sandboxes
end `node_lost`, no create is lost or made twice, the other node keeps working and takes the
new creates; nothing is left on the host afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox as E2bSandbox

from corral import Client, CorralError, Sandbox
from corral.core.errors import ServiceUnavailable
from corral.engine import Engine, HostScope
from corral.host import cgroups
from corral.server.cluster.local import LocalRay
from corral.server.config import ServerConfig
from corral.server.service import REVOKED_EVERY
from tests.conftest import new, require_runtime
from tests.e2e.conftest import SERVER_DIR, Server, start_server
from tests.e2e.test_cli import corral
from tests.e2e.test_lifecycle import COUNTER, count
from tests.e2e.test_webhooks import Receiver, verified
from tests.postgres import running_postgres

NODES = 2
PREVIEW_DOMAIN = "preview.test"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def front(request: pytest.FixtureRequest, data_dir: Path) -> Iterator[Server]:
    """The cluster, its store in the front's SQLite file that every node opens, or in a real
    PostgreSQL server (every test runs on both)."""
    require_runtime("namespaces")
    directory = SERVER_DIR.with_name(f"{SERVER_DIR.name}-cluster-{request.param}")
    with contextlib.ExitStack() as stack:
        if request.param == "postgresql":
            postgres = stack.enter_context(running_postgres())
            patch = stack.enter_context(pytest.MonkeyPatch.context())
            patch.setenv("CORRAL_DATABASE_URL", postgres.database())
        running = start_server(
            directory, data_dir / "images", "--cluster", f"local:{NODES}",
            "--preview-domain", PREVIEW_DOMAIN, start_timeout=240,
        )  # fmt: skip
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
    """Until `check()` holds; a front that says for now that no node is ready (503) or a
    connection that fails is asked again, any other error fails at once."""
    deadline = time.monotonic() + timeout
    while not _holds(check):
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.2)


def _holds(check: Callable[[], bool]) -> bool:
    try:
        return check()
    except CorralError as error:
        if error.status_code != 503:
            raise
    except httpx.TransportError:
        pass
    return False


def scope_cgroups(index: int) -> list[str]:
    group = cgroups.ROOT / ("memory" if cgroups.layout() == "v1" else "") / f"corral-{index}"
    return new(g.name for g in group.glob("sb-*")) if group.is_dir() else []


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
        # A preview by host name reaches its sandbox's node too.
        for sandbox in {s.info().node: s for s in made}.values():  # one on each node
            sandbox.files.write("/srv/index.html", sandbox.id)
            sandbox.run("cd /srv && nohup python3 -m http.server 8000 >/dev/null 2>&1 &")
            _until_previewed(front, sandbox)
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


def _until_previewed(front: Server, sandbox: Sandbox) -> None:
    """Wait until the sandbox's port 8000 answers through the front, by host name."""
    preview = sandbox.expose(8000)
    host = {"Host": f"8000-{sandbox.id}.{PREVIEW_DOMAIN}", **preview.headers}
    deadline = time.monotonic() + 30
    while httpx.get(f"{front.url}/index.html", headers=host).text != sandbox.id:
        assert time.monotonic() < deadline, f"{sandbox.id}'s preview never answered"
        time.sleep(0.2)


def test_an_e2b_program_reaches_sandboxes_on_every_node(
    front: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """E2B's SDK, unchanged, against the front: its control calls and its calls to a sandbox's
    own daemon (which name the sandbox in a header, not the path) reach the sandbox's node."""
    key = front.new_key("cluster-e2b")
    for name, value in (("E2B_API_URL", front.url), ("E2B_SANDBOX_URL", front.url),
                        ("E2B_API_KEY", key)):  # fmt: skip
        monkeypatch.setenv(name, value)
    made: dict[str, E2bSandbox] = {}
    with front.client(key) as tenant:
        try:
            for _ in range(12):  # E2B's creates go to any node: until both have one
                sandbox = E2bSandbox.create(timeout=300)
                node = Sandbox.connect(sandbox.sandbox_id, client=tenant).info().node
                if node in made:
                    sandbox.kill()
                    continue
                made[str(node)] = sandbox
                if len(made) == NODES:
                    break
            assert sorted(made) == ["n0", "n1"]
            for node, sandbox in made.items():
                assert sandbox.commands.run(f"echo on {node}").stdout == f"on {node}\n"
                sandbox.files.write("/tmp/e2b.txt", node)
                assert sandbox.files.read("/tmp/e2b.txt") == node
                assert sandbox.is_running()
        finally:
            for sandbox in made.values():
                sandbox.kill()


def test_a_restarted_cluster_takes_its_sandboxes_back(front: Server) -> None:
    """Stopping the front stops the nodes as any server stops: their sandboxes keep running
    (none is reported lost), and the next start adopts them, reached through the store."""
    key = front.new_key("cluster-restart")
    with front.client(key) as first:
        kept = [s for node in ("n0", "n1") for s in _on_node(front, key, first, node, 1)]
        kept[0].files.write("/root/kept.txt", "before")
    with front.client() as admin:
        admin.drain_node("n0")  # and a drained node stays drained
    front.stop()
    front.start()
    with front.client() as admin:
        assert {n.name: n.state for n in admin.nodes()} == {"n0": "draining", "n1": "ready"}
        admin.drain_node("n0", draining=False)
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


def test_a_drained_node_takes_no_new_sandboxes_and_keeps_its_own(front: Server) -> None:
    key = front.new_key("cluster-drain")
    auth = {"Authorization": f"Bearer {key}"}
    with front.client(key) as tenant, front.client() as admin:
        (kept,) = _on_node(front, key, tenant, "n1", 1)
        assert admin.drain_node("n1").state == "draining"
        assert {n.name: n.state for n in admin.nodes()} == {"n0": "ready", "n1": "draining"}
        made = [Sandbox.create(runtime="namespaces", client=tenant) for _ in range(3)]
        assert {s.info().node for s in made} == {"n0"}
        there = {"runtime": "namespaces", "node": "n1"}
        refused = httpx.post(f"{front.url}/v1/sandboxes", json=there, headers=auth, timeout=60)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "no_node_available"
        assert "n1 is draining" in refused.json()["error"]["message"]
        assert kept.run("echo still here").stdout == "still here\n"
        # Only an admin drains, only a node the cluster has.
        with pytest.raises(CorralError) as forbidden:
            tenant.drain_node("n0")
        assert forbidden.value.status_code == 403
        with pytest.raises(CorralError) as unknown:
            admin.drain_node("n9")
        assert unknown.value.code == "node_not_found"
        # `corral nodes drain --wait` returns once its sandboxes have ended.
        threading.Timer(2, kept.terminate).start()
        waited = corral(front, "nodes", "drain", "n1", "--wait", "120")
        assert waited.returncode == 0, waited.stdout + waited.stderr
        assert "n1: draining, 0 sandboxes in use" in waited.stdout
        assert admin.drain_node("n1", draining=False).state == "ready"
        back = httpx.post(f"{front.url}/v1/sandboxes", json=there, headers=auth, timeout=60)
        assert back.status_code == 201 and back.json()["node"] == "n1"
        for sandbox in [*made, Sandbox.connect(back.json()["id"], client=tenant)]:
            sandbox.terminate()


def test_a_snapshot_taken_on_one_node_starts_and_forks_on_the_other(front: Server) -> None:
    """Memory and files move: the snapshot is copied to the other node (checked against its
    digest there), listed once, and deleted on every node that has a copy."""
    require_runtime("gvisor")
    key = front.new_key("cluster-moves")
    auth = {"Authorization": f"Bearer {key}"}
    with (
        front.client(key) as tenant,
        httpx.Client(base_url=front.url, headers=auth, timeout=180) as http,
    ):
        (origin,) = _on_node(front, key, tenant, "n0", 1, runtime="gvisor", timeout=600)
        origin.exec("python3", "-c", COUNTER)
        wait_until(lambda: origin.files.exists("/root/count"), "the counter counts")
        origin.files.write("/root/moved.txt", "from n0")
        taken = origin.snapshot(name="moving")
        at_snapshot = count(origin)
        made = http.post("/v1/sandboxes", json={"snapshot": "moving", "node": "n1"})
        assert made.status_code == 201, made.text
        started = Sandbox.connect(made.json()["id"], client=tenant)
        assert started.info().node == "n1"
        forked = http.post(f"/v1/sandboxes/{origin.id}/fork", json={"count": 2, "node": "n1"})
        assert forked.status_code == 201, forked.text
        copies = [Sandbox.connect(entry["id"], client=tenant) for entry in forked.json()]
        # Onto its own node: the front sends the body on without `node`, with its new length.
        at_home = http.post(f"/v1/sandboxes/{origin.id}/fork", json={"count": 1, "node": "n0"})
        assert at_home.status_code == 201, at_home.text
        copies.append(Sandbox.connect(at_home.json()[0]["id"], client=tenant))
        try:
            for copy in (started, *copies):
                assert copy.info().node == ("n0" if copy is copies[-1] else "n1")
                assert copy.files.read_text("/root/moved.txt") == "from n0"
                assert count(copy) >= at_snapshot  # its memory went on from the snapshot
            assert [s["id"] for s in http.get("/v1/snapshots").json()] == [taken.id]
            held = [front.data_dir / "nodes" / n / "snapshots" / taken.id for n in ("n0", "n1")]
            assert all(path.is_dir() for path in held)
            # Neither a tenant nor another admin can take archives (a sandbox's memory), and
            # nobody can fork onto a node that is not there.
            archive = http.get(f"/v1/snapshots/{taken.id}/archive")
            assert archive.status_code == 403
            assert archive.json()["error"]["code"] == "admin_required"
            admin = {"Authorization": f"Bearer {front.admin_key}"}
            for method in ("GET", "PUT"):
                refused = http.request(
                    method, f"/v1/snapshots/{taken.id}/archive", headers=admin, content=b"x"
                )
                assert refused.status_code == 403
                assert refused.json()["error"]["code"] == "cluster_front_only"
            nowhere = http.post(f"/v1/sandboxes/{origin.id}/fork", json={"count": 1, "node": "n7"})
            assert nowhere.status_code == 400
            assert nowhere.json()["error"]["code"] == "node_not_found"
            assert http.delete("/v1/snapshots/moving").status_code == 204
            assert http.get("/v1/snapshots/moving").status_code == 404
            assert not any(path.exists() for path in held)
        finally:
            for sandbox in (origin, started, *copies):
                sandbox.terminate()


def test_a_sandbox_moves_to_the_other_node_keeping_its_id_memory_and_files(
    front: Server,
) -> None:
    """Hibernated on n0 and woken on n1 with its memory and files; a running one moves back
    and runs on; a draining node's sandboxes that can move, move; the rest stay."""
    require_runtime("gvisor")
    key = front.new_key("cluster-move")
    auth = {"Authorization": f"Bearer {key}"}
    with (
        front.client(key) as tenant,
        front.client() as admin,
        httpx.Client(base_url=front.url, headers=auth, timeout=180) as http,
    ):
        (moving,) = _on_node(front, key, tenant, "n0", 1, runtime="gvisor", timeout=600)
        (staying,) = _on_node(front, key, tenant, "n0", 1)
        moving.exec("python3", "-c", COUNTER)
        wait_until(lambda: moving.files.exists("/root/count"), "the counter counts")
        moving.files.write("/root/moved.txt", "from n0")
        before = count(moving)
        moving.hibernate()
        moved = moving.move("n1")  # the SDK's
        assert (moved.id, moved.node, moved.state.value) == (moving.id, "n1", "hibernated")
        assert not (front.data_dir / "nodes" / "n0" / "sandboxes" / moving.id).exists()
        assert count(moving) >= before and moving.info().node == "n1"
        after = count(moving)
        wait_until(lambda: count(moving) > after, "the counter counts on, on n1")
        assert moving.files.read_text("/root/moved.txt") == "from n0"
        # A running sandbox moves and runs on; the front picks the node.
        back = http.post(f"/v1/sandboxes/{moving.id}/move", json={})
        assert back.status_code == 200, back.text
        assert (back.json()["node"], back.json()["state"]) == ("n0", "running")
        assert "moving to node n0" in [h["reason"] for h in back.json()["history"]]
        assert [s.id for s in Sandbox.list(client=tenant) if s.id == moving.id] == [moving.id]
        # What cannot move is refused, clearly, and runs on where it is.
        for body, status, code in (
            ({"node": "n0"}, 400, "same_node"),
            ({"node": "n7"}, 400, "node_not_found"),
            ({"nodes": "n1"}, 400, "invalid_request"),
        ):
            refused = http.post(f"/v1/sandboxes/{moving.id}/move", json=body)
            assert (refused.status_code, refused.json()["error"]["code"]) == (status, code)
        fixed = http.post(f"/v1/sandboxes/{staying.id}/move", json={"node": "n1"})
        assert fixed.status_code == 400 and fixed.json()["error"]["code"] == "not_supported"
        stranger = {"Authorization": f"Bearer {front.new_key('cluster-move-2')}"}
        theirs = http.post(f"/v1/sandboxes/{moving.id}/move", json={}, headers=stranger)
        assert theirs.status_code == 404
        for who, code in ((auth, "admin_required"), (admin_auth(front), "cluster_front_only")):
            handed = http.post(
                f"/v1/sandboxes/{moving.id}/hand-off", json={"to": "n1"}, headers=who
            )
            assert (handed.status_code, handed.json()["error"]["code"]) == (403, code)
        # Draining n0 moves the gVisor sandbox away (woken there: it was running).
        admin.drain_node("n0")
        try:
            wait_until(lambda: _runs_on(moving, "n1"), "the drain moves it", timeout=180)
            assert moving.files.read_text("/root/moved.txt") == "from n0"
            assert staying.info().node == "n0"
            assert staying.run("echo still here").stdout == "still here\n"
        finally:
            admin.drain_node("n0", draining=False)
            for sandbox in (moving, staying):
                sandbox.terminate()


def _runs_on(sandbox: Sandbox, node: str) -> bool:
    """Whether `sandbox` runs on `node`: answered by that node once it has taken the sandbox
    in, it says hibernated until it has woken it."""
    info = sandbox.info()
    return (info.node, info.state) == (node, "running")


def admin_auth(front: Server) -> dict[str, str]:
    return {"Authorization": f"Bearer {front.admin_key}"}


def test_a_keys_quota_holds_across_the_nodes(front: Server) -> None:
    """Each node alone would let the key have more: the front counts its sandboxes on both."""
    key = front.new_key("cluster-quota")
    admin = {"Authorization": f"Bearer {front.admin_key}"}
    limit = httpx.put(
        f"{front.url}/v1/keys/cluster-quota/quota", json={"memory_mb": 1024}, headers=admin
    )
    assert limit.status_code == 200, limit.text
    with front.client(key) as tenant:
        made = [
            *_on_node(front, key, tenant, "n0", 1, memory_mb=512),
            *_on_node(front, key, tenant, "n1", 1, memory_mb=512),
        ]
        auth = {"Authorization": f"Bearer {key}"}
        for node in ("n0", "n1"):
            refused = httpx.post(
                f"{front.url}/v1/sandboxes",
                json={"runtime": "namespaces", "memory_mb": 512, "node": node},
                headers=auth,
                timeout=60,
            )
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["code"] == "quota_exceeded"
            assert "across the cluster" in refused.json()["error"]["message"]
        made.pop().terminate()

        def room() -> bool:  # once n1 has written the end into the store
            answer = httpx.post(
                f"{front.url}/v1/sandboxes",
                json={"runtime": "namespaces", "memory_mb": 512, "node": "n0"},
                headers=auth,
                timeout=60,
            )
            if answer.status_code == 201:
                made.append(Sandbox.connect(answer.json()["id"], client=tenant))
            else:
                assert answer.json()["error"]["code"] == "quota_exceeded", answer.text
            return answer.status_code == 201

        wait_until(room, "the ended sandbox's memory counts no more", timeout=30)
        for sandbox in made:
            sandbox.terminate()


def test_a_node_killed_with_sigkill_mid_load_is_lost_and_no_create_is_lost_or_doubled(
    front: Server,
) -> None:
    key = front.new_key("cluster-loss")
    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    with front.client(key) as tenant, front.client() as admin:
        # A webhook registered through the front (on one node) reaches every node and the
        # front, which share the store: each takes it up within a few seconds.
        url = f"http://localhost:{receiver.server_address[1]}/cluster"
        hook = tenant.create_webhook(url, events=["sandbox.state"])
        time.sleep(REVOKED_EVERY + 1)
        victims = _on_node(front, key, tenant, "n1", 2)
        (survivor,) = _on_node(front, key, tenant, "n0", 1)
        wanted = {survivor.id, *(v.id for v in victims)}
        wait_until(lambda: _delivered(receiver) >= wanted, "both nodes deliver")
        events = EventReader(front.url, key, {v.id for v in victims})
        load = CreateLoad(front.url, key, count=12, at_once=6)
        assert load.n1_answered.wait(120), "no create reached n1"
        LocalRay(front.data_dir / "cluster", NODES).kill_node(1)  # creates still in flight
        load.finish()
        wait_until(lambda: {n.name: n.state for n in admin.nodes()}["n1"] == "lost", "n1 is lost")
        for victim in victims:
            ended = victim.info()
            assert ended.state.value == "terminated"
            assert ended.end_reason is not None and ended.end_reason.value == "node_lost"
            assert ended.end_detail and "n1" in ended.end_detail
        # The key's event stream at the front says so too (the node's own cannot).
        events.thread.join(timeout=60)
        assert events.lost >= {v.id for v in victims}  # and any made on n1 by the load
        # And so do the key's webhooks, sent by the front, signed with the webhook's secret.
        lost = {v.id for v in victims}
        wait_until(lambda: _delivered(receiver, "node_lost") >= lost, "webhooks hear of the loss")
        assert all(verified(hook["secret"], delivery) for delivery in receiver.at("/cluster"))
        assert survivor.run("echo still here").stdout == "still here\n"
        # Every create either made one sandbox and said which, or failed and said why; what a
        # failed one may have made on n1 ended with it; nothing runs that nobody was given.
        made = [a.json() for a in load.answers if a.status_code == 201]
        failed = [a for a in load.answers if a.status_code != 201]
        assert len(made) + len(failed) == 12 and len({m["id"] for m in made}) == len(made)
        assert {a.json()["error"]["code"] for a in failed} <= {"node_unavailable"}
        known = {m["id"] for m in made} | {v.id for v in victims} | {survivor.id}
        after = Sandbox.create(runtime="namespaces", client=tenant)
        assert after.info().node == "n0"
        wait_until(lambda: scope_cgroups(1) == [], "n1's sandboxes are cleaned up")
        wait_until(
            lambda: all(
                i.state.value == "terminated" for i in Sandbox.list(client=tenant) if i.node == "n1"
            ),
            "n1's sandboxes are ended in the store",
        )
        everything = {info.id: info for info in Sandbox.list(client=tenant)}
        assert all(everything[i].node == "n1" for i in events.lost)
        unknown = {i: everything[i] for i in everything.keys() - known - {after.id}}
        assert len(unknown) <= len(failed)
        for info in [*unknown.values(), *(everything[m["id"]] for m in made)]:
            if info.node == "n1":
                assert info.end_reason is not None and info.end_reason.value == "node_lost"
            else:
                assert info.id not in unknown and info.state.value == "running"
        for m in made:
            if everything[m["id"]].node == "n0":
                assert Sandbox.connect(m["id"], client=tenant).run("echo ok").stdout == "ok\n"
                Sandbox.connect(m["id"], client=tenant).terminate()
        for sandbox in (survivor, after):
            sandbox.terminate()
        tenant.delete_webhook(hook["id"])
    receiver.shutdown()
    receiver.server_close()


def _delivered(receiver: Receiver, end_reason: str | None = None) -> set[str]:
    """The sandboxes whose events reached the webhook (those that ended so, if given)."""
    events = [delivery["body"]["data"] for delivery in receiver.at("/cluster")]
    return {e["sandbox_id"] for e in events if end_reason in (None, e["end_reason"])}


class CreateLoad:
    """`count` creates through the front, `at_once` at a time, on threads."""

    def __init__(self, url: str, key: str, *, count: int, at_once: int) -> None:
        self.answers: list[httpx.Response] = []
        self.n1_answered = threading.Event()
        self._pool = ThreadPoolExecutor(at_once)
        self._futures = [self._pool.submit(self._create, url, key) for _ in range(count)]

    def _create(self, url: str, key: str) -> None:
        auth = {"Authorization": f"Bearer {key}"}
        body = {"runtime": "namespaces"}
        answer = httpx.post(f"{url}/v1/sandboxes", json=body, headers=auth, timeout=180)
        self.answers.append(answer)
        if answer.status_code == 201 and answer.json()["node"] == "n1":
            self.n1_answered.set()

    def finish(self) -> None:
        for future in self._futures:
            future.result(timeout=240)
        self._pool.shutdown()


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


def _on_node(
    front: Server, key: str, client: Client, node: str, count: int, **spec: object
) -> list[Sandbox]:
    """`count` sandboxes made on `node` by the selector (an HTTP field, not in the SDK)."""
    made = []
    for _ in range(count):
        answer = httpx.post(
            f"{front.url}/v1/sandboxes",
            json={"runtime": "namespaces", **spec, "node": node},
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
