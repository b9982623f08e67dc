"""Cluster mode's pieces that need no cluster: its options, placement, routing by path, and
that the one-machine path never imports Ray."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from corral.core.errors import CorralError
from corral.server.cluster import api, joining
from corral.server.cluster.gather import labelled
from corral.server.cluster.placement import Node, choose, node_entry
from corral.server.cluster.proxy import sandbox_of
from corral.server.config import ServerConfig


def test_the_one_machine_path_never_imports_ray() -> None:
    program = (
        "import sys, corral.cli, corral.server.app, corral.server.service\n"
        "from corral.server.config import ServerConfig\n"
        "corral.server.app.create_app(ServerConfig(data_dir=__import__('pathlib').Path('/x')))\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(("cluster", "nodes"), [("local:1", 1), ("local:3", 3), ("local:16", 16)])
def test_a_local_cluster_is_named_by_its_node_count(cluster: str, nodes: int) -> None:
    config = ServerConfig(data_dir=Path("/x"), cluster=cluster)
    assert (config.cluster_nodes, config.ray_address) == (nodes, None)


JOINED = {"database_url": "postgresql://corral@db/corral", "at_rest_key": Path("/etc/k")}


@pytest.mark.parametrize(
    "cluster", ["auto", "10.0.0.1:6379", "ray://head.svc:10001", "ray://10.0.0.1:10001"]
)
def test_a_running_ray_cluster_is_joined_by_its_address(cluster: str) -> None:
    config = ServerConfig(data_dir=Path("/x"), cluster=cluster, **JOINED)  # type: ignore[arg-type]
    assert (config.cluster_nodes, config.ray_address) == (0, cluster)


@pytest.mark.parametrize(
    "cluster",
    [
        "local:0",
        "local:17",
        "local:",
        "local:x",
        "ray://",
        "ray://h",
        "http://h:1",
        "h",
        "",
        " auto",
    ],
)
def test_a_cluster_that_is_not_supported_is_refused_saying_what_is(cluster: str) -> None:
    with pytest.raises(CorralError) as refused:
        ServerConfig(data_dir=Path("/x"), cluster=cluster, **JOINED)  # type: ignore[arg-type]
    assert refused.value.code == "invalid_cluster" and refused.value.status_code == 400
    assert "local:N" in str(refused.value) and "ray://HOST:PORT" in str(refused.value)


@pytest.mark.parametrize(
    ("settings", "needed"),
    [({"at_rest_key": Path("/etc/k")}, "--database-url postgresql://"),
     ({"database_url": "sqlite:////var/lib/c.db", "at_rest_key": Path("/k")}, "postgresql://"),
     ({"database_url": "postgresql://corral@db/corral"}, "--at-rest-key")],
)  # fmt: skip
def test_a_joined_cluster_needs_a_shared_store_and_at_rest_key(
    settings: dict[str, Any], needed: str
) -> None:
    with pytest.raises(CorralError) as refused:
        ServerConfig(data_dir=Path("/x"), cluster="auto", **settings)
    assert refused.value.code == "invalid_cluster" and needed in str(refused.value)


def test_a_joined_node_names_itself_and_serves_tls_on_its_ray_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(joining.STORE_ENV, raising=False)
    monkeypatch.setenv(joining.KEY_ENV, "/etc/corral/at-rest.key")
    monkeypatch.setenv(joining.NAME_ENV, "gpu-7")
    monkeypatch.setenv(joining.SCOPE_ENV, "3")
    settings = {"host": "127.0.0.1", "data_dir": str(tmp_path), "args": ["--log-level", "info"]}
    with pytest.raises(ValueError, match=f"set {joining.STORE_ENV} in the Ray node's"):
        joining.node_server(settings)  # it would serve a store of its own
    monkeypatch.setenv(joining.STORE_ENV, "postgresql://corral:secret@db/corral")
    argv, joined = joining.node_server(settings)
    assert (joined.name, joined.scope) == ("gpu-7", 3)
    assert joined.url.startswith("https://127.0.0.1:")
    assert joined.ca == (tmp_path / "gpu-7" / "tls" / "ca.pem").read_text()
    assert not [arg for arg in argv if "secret" in arg or "at-rest" in arg]  # not through Ray
    served = argv[argv.index("serve") :]
    for option, value in (("--host", "127.0.0.1"), ("--data-dir", str(tmp_path / "gpu-7")),
                          ("--node-name", "gpu-7"), ("--tls", "auto"), ("--host-scope", "3"),
                          ("--port", joined.url.rsplit(":", 1)[1]), ("--log-level", "info")):  # fmt: skip
        assert served[served.index(option) + 1] == value
    monkeypatch.setenv(joining.NAME_ENV, "../etc")
    with pytest.raises(ValueError, match=joining.NAME_ENV):
        joining.node_name()
    monkeypatch.setenv(joining.SCOPE_ENV, "16")
    with pytest.raises(ValueError, match="0 to 15"):
        joining.node_scope()


def test_a_shared_sqlite_store_is_named_by_an_absolute_path() -> None:
    config = ServerConfig(data_dir=Path("/x"), database_url="sqlite:////var/lib/c/corral.db")
    assert config.database == Path("/var/lib/c/corral.db")
    with pytest.raises(CorralError) as refused:
        ServerConfig(data_dir=Path("/x"), database_url="sqlite:///relative.db")
    assert refused.value.code == "invalid_database_url"


def _node(name: str, cpu_used: float, runtimes: tuple[str, ...] = ("namespaces",),
          idle: int = 0) -> dict[str, Any]:  # fmt: skip
    return {
        "name": name, "runtimes": list(runtimes), "capacity": {"cpu": 4.0},
        "allocated": {"cpu": cpu_used},
        "pools": [{"name": "p", "runtime": "namespaces", "image": "debian", "size": 1,
                   "idle": idle}],
    }  # fmt: skip


def _choose(
    seen: dict[str, dict[str, Any] | None], body: Any, draining: tuple[str, ...] = ()
) -> tuple[list[str], Any] | None:
    nodes = {
        name: Node(name, index, f"http://n{index}", "ready" if info is not None else "lost",
                   draining=name in draining)
        for index, (name, info) in enumerate(seen.items())
    }  # fmt: skip

    async def describe(node: Node) -> dict[str, Any] | None:
        return seen[node.name]

    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    chosen = asyncio.run(choose(nodes, describe, raw))
    if chosen is None:
        return None
    return [n.name for n in chosen[0]], json.loads(chosen[1])


def test_creates_go_to_the_emptiest_node_first_and_to_a_pool_hit_before_that() -> None:
    seen = {"n0": _node("n0", 3.0), "n1": _node("n1", 1.0), "n2": _node("n2", 2.0)}
    assert _choose(seen, {})[0] == ["n1", "n2", "n0"]  # type: ignore[index]
    seen["n0"] = _node("n0", 3.0, idle=1)
    assert _choose(seen, {"runtime": "namespaces"})[0][0] == "n0"  # type: ignore[index]


def test_only_nodes_with_the_runtime_and_alive_are_candidates() -> None:
    seen = {
        "n0": _node("n0", 0.0, runtimes=("namespaces",)),
        "n1": _node("n1", 1.0, runtimes=("gvisor", "namespaces")),
        "n2": None,  # lost
    }
    assert _choose(seen, {"runtime": "gvisor"})[0] == ["n1"]  # type: ignore[index]
    with pytest.raises(CorralError) as refused:
        _choose({"n0": _node("n0", 0.0)}, {"runtime": "gvisor"})
    assert (refused.value.status_code, refused.value.code) == (429, "no_node_available")
    assert "none runs gvisor" in str(refused.value)


def test_a_node_selector_picks_one_and_is_not_sent_on() -> None:
    seen = {"n0": _node("n0", 0.0), "n1": _node("n1", 3.0)}
    names, body = _choose(seen, {"node": "n1", "cpu": 1})  # type: ignore[misc]
    assert names == ["n1"] and body == {"cpu": 1}
    with pytest.raises(CorralError) as unknown:
        _choose(seen, {"node": "n7"})
    assert (unknown.value.status_code, unknown.value.code) == (400, "node_not_found")
    with pytest.raises(CorralError) as wrong_type:
        _choose(seen, {"node": ["n0"]})
    assert wrong_type.value.code == "node_not_found"
    with pytest.raises(CorralError) as lost:
        _choose({"n0": _node("n0", 0.0), "n1": None}, {"node": "n1"})
    assert lost.value.code == "no_node_available" and "n1 is lost" in str(lost.value)


def test_a_draining_node_takes_no_new_sandboxes_and_is_listed_so() -> None:
    seen = {"n0": _node("n0", 3.0), "n1": _node("n1", 0.0)}
    assert _choose(seen, {}, draining=("n1",))[0] == ["n0"]  # type: ignore[index]
    with pytest.raises(CorralError) as refused:
        _choose(seen, {"node": "n1"}, draining=("n1",))
    assert refused.value.code == "no_node_available" and "n1 is draining" in str(refused.value)
    node = Node("n1", 1, "http://n1", "ready", draining=True)
    assert node_entry(node, {"name": "n1", "state": "ready"})["state"] == "draining"
    assert node_entry(replace(node, state="lost"), None)["state"] == "lost"


def test_nodes_are_listed_as_they_were_asked_when_one_joins_meanwhile() -> None:
    """A node that joins while the others are asked is listed next time, not a 500 (the
    front's list of nodes grows under the `await`)."""
    nodes = {"n0": Node("n0", 0, "http://n0", "ready")}

    async def describe(node: Node) -> dict[str, Any] | None:
        nodes["n1"] = Node("n1", 1, "http://n1", "starting")  # its `hello` arrives now
        await asyncio.sleep(0)
        return {**_node(node.name, 0.0), "state": "ready"}

    front = SimpleNamespace(nodes=nodes, describe=describe)
    listed = asyncio.run(api._listed(front))  # type: ignore[arg-type]
    assert [(entry["name"], entry["state"]) for entry in listed] == [("n0", "ready")]


def test_a_body_that_is_not_an_object_is_left_to_a_node_to_refuse() -> None:
    seen = {"n0": _node("n0", 0.0)}
    assert _choose(seen, b"{not json") is None
    assert _choose(seen, [1, 2]) is None


@pytest.mark.parametrize(
    ("path", "sandbox"),
    [
        ("/v1/sandboxes/sb-0123456789abcdef/exec", "sb-0123456789abcdef"),
        ("/v1/sandboxes/sb-0123456789abcdef", "sb-0123456789abcdef"),
        ("/preview/sb-0123456789abcdef/8080/index.html", "sb-0123456789abcdef"),
        ("/sandboxes/sb-0123456789abcdef/connect", "sb-0123456789abcdef"),
        ("/v2/sandboxes/sb-0123456789abcdef/connect", "sb-0123456789abcdef"),
        ("/v1/sandboxes", None),
        ("/sandboxes", None),
        ("/v1/sandboxes/usage", None),
        ("/v1/images/im-1", None),
    ],
)
def test_requests_about_a_sandbox_are_routed_by_its_id(path: str, sandbox: str | None) -> None:
    assert sandbox_of(path) == sandbox


def test_e2b_requests_to_a_sandboxs_daemon_are_routed_by_their_header() -> None:
    named = [(b"e2b-sandbox-id", b"sb-0123456789abcdef"), (b"e2b-sandbox-port", b"49983")]
    assert sandbox_of("/process.Process/Start", named) == "sb-0123456789abcdef"
    assert sandbox_of("/files", [(b"e2b-sandbox-id", b"../etc")]) is None


def test_previews_by_host_name_are_routed_by_the_sandbox_in_it() -> None:
    host = [(b"host", b"8000-sb-0123456789abcdef.preview.test")]
    assert sandbox_of("/index.html", host) == "sb-0123456789abcdef"
    assert sandbox_of("/", [(b"host", b"sb-0123456789abcdef.preview.test")]) is None
    assert sandbox_of("/", [(b"host", b"127.0.0.1:8470")]) is None


def test_metrics_of_the_nodes_are_one_exposition_labelled_by_node() -> None:
    exposition = (
        "# HELP corral_sandboxes Live sandboxes.\n# TYPE corral_sandboxes gauge\n"
        'corral_sandboxes{runtime="gvisor"} 2.0\ncorral_sandboxes{} 1.0\n'
        "# HELP corral_up Up.\n# TYPE corral_up gauge\ncorral_up 1.0\n"
    )
    merged = labelled({"n0": exposition, "n1": exposition.replace("2.0", "5.0")})
    assert merged.splitlines() == [
        "# HELP corral_sandboxes Live sandboxes.",
        "# TYPE corral_sandboxes gauge",
        'corral_sandboxes{node="n0",runtime="gvisor"} 2.0',
        'corral_sandboxes{node="n0"} 1.0',
        'corral_sandboxes{node="n1",runtime="gvisor"} 5.0',
        'corral_sandboxes{node="n1"} 1.0',
        "# HELP corral_up Up.",
        "# TYPE corral_up gauge",
        'corral_up{node="n0"} 1.0',
        'corral_up{node="n1"} 1.0',
    ]


def test_the_driver_waits_for_a_head_that_does_not_answer_yet_then_says_so() -> None:
    """A front may start before its cluster's head answers: the driver tries again, saying
    so in its log, and gives up with Ray's error past its time (the front reports it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there
    script = (
        "from corral.server.cluster import agent; agent.CONNECT_TIMEOUT = 6; "
        f"agent._connect('ray://127.0.0.1:{port}')"
    )
    env = {**os.environ, "RAY_CLIENT_INITIAL_CONNECTION_TIMEOUT_S": "1"}
    env["RAY_CLIENT_MAX_CONNECTION_TIMEOUT_S"] = "1"  # Ray Client's own tries: 3 of 1 s
    argv = [sys.executable, "-c", script]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode != 0
    assert f"Ray at ray://127.0.0.1:{port} does not answer yet" in done.stderr
    assert done.stderr.rstrip().endswith("ConnectionError: ray client connection timeout")


async def test_a_local_clusters_nodes_get_the_fronts_start_limit(tmp_path: Path) -> None:
    from corral.server.cluster.front import Front

    async def evacuate(_front: Front, _node: Any) -> None:
        raise AssertionError("nothing drains here")

    for limit, expected in ((None, None), (0, "0"), (3, "3")):
        front = Front(ServerConfig(data_dir=tmp_path, start_limit=limit), 0, evacuate)
        argv = front._shared_args()
        await front.http.aclose()
        given = argv[argv.index("--start-limit") + 1] if "--start-limit" in argv else None
        assert given == expected


async def test_a_local_clusters_nodes_doze_as_the_front_does(tmp_path: Path) -> None:
    from corral.server.cluster.front import Front

    async def evacuate(_front: Front, _node: Any) -> None:
        raise AssertionError("nothing drains here")

    for doze_after, expected in ((None, "0"), (2.5, "2.5"), (10.0, "10.0")):
        front = Front(ServerConfig(data_dir=tmp_path, doze_after=doze_after), 0, evacuate)
        argv = front._shared_args()
        await front.http.aclose()
        assert argv[argv.index("--doze-after") + 1] == expected


async def test_a_lost_node_is_listed_lost_only_once_its_sandboxes_have_ended(
    tmp_path: Path,
) -> None:
    """Whoever sees a node lost finds its sandboxes ended: until the store says so, the node
    is listed unreachable (and takes no sandboxes, nor requests for its own)."""
    from corral.server.cluster.front import Front

    async def evacuate(_front: Front, _node: Any) -> None:
        raise AssertionError("nothing drains here")

    front = Front(ServerConfig(data_dir=tmp_path), 0, evacuate)
    node = front.nodes.setdefault("j1", Node("j1", 1, "https://j1", "ready"))
    listed: list[tuple[str, list[Node]]] = []
    failures = [OSError("the store is down")]  # the first try fails: tried again

    class Store:
        async def live_sandboxes(self) -> list[Any]:
            listed.append((node_entry(node, None)["state"], front.ready()))
            if failures:
                raise failures.pop()
            return []

    front._store = Store()  # type: ignore[assignment]
    await front.lost(node, "Ray lost it")
    assert node_entry(node, None)["state"] == "unreachable"
    await asyncio.wait_for(asyncio.gather(*front._retries), 30)
    await front.http.aclose()
    assert listed == [("unreachable", []), ("unreachable", [])]
    assert node_entry(node, None)["state"] == "lost" and node.detail == "Ray lost it"


async def test_a_node_that_answers_slowly_at_first_is_ready_and_one_that_refuses_is_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A joining node whose `/v1/nodes` fails at first (busy: a 503, a timeout) is asked again
    and becomes ready; only one that refuses the front's key (it does not share the front's
    store) is lost for it, and one that does not list itself in time."""
    from corral.server.cluster import front as fronts
    from corral.server.cluster.front import Front

    monkeypatch.setattr(fronts, "START_TIMEOUT", 20.0)  # a regression fails, not hangs
    monkeypatch.setattr(fronts, "LIST_TIMEOUT", 1.0)

    async def evacuate(_front: Front, _node: Any) -> None:
        raise AssertionError("nothing drains here")

    class Store:
        async def live_sandboxes(self) -> list[Any]:
            return []

    cases = (
        ([503, 503, 200], "ready", None),
        ([503, 401], "lost", "does not share the front's store"),
        ([503], "lost", "did not list itself"),  # for LIST_TIMEOUT
    )
    for answers, state, why in cases:
        left = list(answers)

        def answer(request: httpx.Request, left: list[int] = left) -> httpx.Response:
            if request.url.path == "/healthz":
                return httpx.Response(200, json={"status": "ok"})
            status = left.pop(0) if len(left) > 1 else left[0]
            if status != 200:
                return httpx.Response(status, json={"error": {"code": "x", "message": "x"}})
            return httpx.Response(200, json=[{**_node("j1", 0.0), "state": "ready"}])

        front = Front(ServerConfig(data_dir=tmp_path), 0, evacuate)
        front._store = Store()  # type: ignore[assignment]
        await front.http.aclose()
        front.http = httpx.AsyncClient(transport=httpx.MockTransport(answer))
        node = front.nodes.setdefault("j1", Node("j1", 1, "https://j1"))
        await front._until_healthy(node)
        await front.http.aclose()
        assert node.state == state
        assert why is None or (node.detail is not None and why in node.detail)


async def test_a_lost_nodes_sandboxes_are_ended_as_the_store_has_them_now(tmp_path: Path) -> None:
    """A sandbox listed on the lost node that moved off it (or ended) meanwhile is left as it
    now is, not overwritten from the list."""
    from corral.core.models import SandboxInfo
    from corral.core.spec import SandboxSpec
    from corral.core.state import SandboxState
    from corral.server.cluster.front import Front

    async def evacuate(_front: Front, _node: Any) -> None:
        raise AssertionError("nothing drains here")

    def on(node: str, number: int) -> SandboxInfo:
        spec = SandboxSpec(runtime="namespaces")
        return SandboxInfo(id=f"sb-{number:016x}", state=SandboxState.RUNNING,
                           runtime="namespaces", spec=spec, created_at=0.0, expires_at=None,
                           node=node)  # fmt: skip

    listed = [on("j1", 1), on("j1", 2)]
    now = {"sb-0000000000000001": on("j0", 1), "sb-0000000000000002": on("j1", 2)}
    written: list[SandboxInfo] = []

    class Store:
        async def live_sandboxes(self) -> list[SandboxInfo]:
            return listed

        async def get_sandbox(self, sandbox_id: str) -> tuple[str, SandboxInfo]:
            return "key-1", now[sandbox_id]  # the first moved to j0 since it was listed

        async def update_sandbox(self, info: SandboxInfo, *, live_on: str) -> bool:
            if now[info.id].node != live_on:  # as the store's conditional write
                return False
            written.append(info)
            return True

    front = Front(ServerConfig(data_dir=tmp_path), 0, evacuate)
    front._store = Store()  # type: ignore[assignment]
    await front.lost(front.nodes.setdefault("j1", Node("j1", 1, "https://j1", "ready")), "gone")
    await front.http.aclose()
    assert [(info.id, info.state.value, info.node) for info in written] == [
        ("sb-0000000000000002", "terminated", "j1")
    ]


async def test_a_fork_across_nodes_that_loses_a_node_midway_says_so_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All or nothing: the copies made before a node stopped answering are deleted, and the
    caller gets `node_unavailable` (503), not an HTTP 500."""
    from starlette.requests import Request

    from corral.server.cluster import moves
    from corral.server.cluster.front import Front

    async def evacuate(_front: Front, _node: Any) -> None:
        raise AssertionError("nothing drains here")

    async def copied(*_args: Any) -> None:
        return None

    monkeypatch.setattr(moves, "copy", copied)
    seen: list[tuple[str, str]] = []
    creates = iter([httpx.Response(201, json={"id": "sb-0000000000000001"}), None])

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, f"{request.url.host}{request.url.path}"))
        if request.method == "GET":
            return httpx.Response(200, json={"spec": {"runtime": "gvisor"}})
        if request.url.path.endswith("/snapshot"):
            return httpx.Response(201, json={"id": "snap-1"})
        if request.method == "POST":
            made = next(creates)
            if made is None:
                raise httpx.ConnectError("refused", request=request)
            return made
        return httpx.Response(204)

    front = Front(ServerConfig(data_dir=tmp_path), 0, evacuate)
    await front.http.aclose()
    front.http = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    source, target = Node("j0", 0, "https://j0", "ready"), Node("j1", 1, "https://j1", "ready")
    request = Request({"type": "http", "method": "POST", "headers": [], "path": "/"})
    with pytest.raises(CorralError) as refused:
        await moves.fork_across(
            front, request, "sb-00000000000000aa", source=source, target=target, count=2
        )
    await front.http.aclose()
    assert (refused.value.status_code, refused.value.code) == (503, "node_unavailable")
    assert ("DELETE", "j1/v1/sandboxes/sb-0000000000000001") in seen
    assert {("DELETE", "j0/v1/snapshots/snap-1"), ("DELETE", "j1/v1/snapshots/snap-1")} <= set(seen)


async def test_an_answer_from_before_an_undrain_does_not_drain_the_node_again(
    tmp_path: Path,
) -> None:
    """A node's view asked before a drain or undrain made here and answered after it is
    stale on that point: the front's holds, and nothing is moved off the node."""
    from corral.server.cluster.front import Front

    async def evacuate(_front: Front, _node: Any) -> None:
        raise AssertionError("nothing drains here")

    node = Node("j1", 1, "https://j1", "ready", draining=True)

    def answer(request: httpx.Request) -> httpx.Response:
        node.draining, node.drains = False, node.drains + 1  # undrained meanwhile
        return httpx.Response(200, json=[{**_node("j1", 0.0), "state": "draining"}])

    front = Front(ServerConfig(data_dir=tmp_path), 0, evacuate)
    await front.http.aclose()
    front.http = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    seen = await front.describe(node)  # as a list or a create asks
    await front.http.aclose()
    assert seen is not None and seen["state"] == "ready"
    assert not node.draining and not front._evacuations
