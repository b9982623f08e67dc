"""Cluster mode joining a Ray cluster that the operator runs (`corral serve --cluster
HOST:PORT`), on a real Ray cluster on this machine, with the store in a real PostgreSQL.

The operator's Ray nodes offer the resource `corral_node` and name their Corral nodes in their
environment (`CORRAL_NODE_NAME`, and `CORRAL_HOST_SCOPE` since they share this machine). Each
node's server serves TLS from its own CA, which the front trusts as the node joins: the tests
go through the front to both nodes (HTTP, streams, a WebSocket, a move between them), see a
node join after the front started, a node whose raylet is killed end its sandboxes
`node_lost`, and the same node join again under its name and take sandboxes again.

Ray registers a node started with --node-ip-address=127.0.0.1 under the machine's address, so
the nodes' servers listen there while these tests run, as they would on an operator's network."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from corral import Image, Sandbox
from corral.engine import Engine, HostScope
from corral.engine.sealing import KeyRing
from corral.images.store import ImageStore
from corral.server.cluster.joining import KEY_ENV, NAME_ENV, RESOURCE, SCOPE_ENV, STORE_ENV
from tests.cluster.test_local_cluster import _on_node, scope_cgroups, wait_until
from tests.conftest import require_runtime
from tests.e2e.conftest import SERVER_DIR, Server, free_port, start_server
from tests.e2e.test_lifecycle import COUNTER, count
from tests.postgres import running_postgres

SCOPES = {"j0": 10, "j1": 11}  # host scopes no other test uses
MARK = "CORRAL_TEST_RAY"  # in the environment of every process of the operator's cluster


class OperatorsRay:
    """A Ray cluster as an operator runs it, on 127.0.0.1: a head and workers, each a Ray
    node that offers `corral_node` and names its Corral node."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env  # every node's: the store's URL and the at-rest key, as an operator sets
        self.temp = Path(tempfile.mkdtemp(prefix="corral-join-", dir="/tmp"))
        self.port, self.client_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"  # its GCS
        self.mark = secrets.token_hex(8)
        self._ray = str(Path(sys.executable).parent / "ray")

    def add(self, name: str, *, head: bool = False) -> None:
        role = (
            [
                "--head",
                f"--port={self.port}",
                "--include-dashboard=false",
                f"--ray-client-server-port={self.client_port}",
            ]
            if head
            else [f"--address={self.address}"]
        )
        env = {**os.environ, **self.env, "RAY_USAGE_STATS_ENABLED": "0"}
        env[MARK] = f"{self.mark}:{name}"
        env.update({NAME_ENV: name, SCOPE_ENV: str(SCOPES[name])})
        subprocess.run(
            [
                self._ray, "start", *role, "--node-ip-address=127.0.0.1",
                f"--temp-dir={self.temp}", "--num-cpus=1", f'--resources={{"{RESOURCE}": 1}}',
                "--disable-usage-stats",
            ],
            env=env, capture_output=True, check=True, timeout=180,
        )  # fmt: skip

    def processes(self, name: str | None = None, command: bytes = b"") -> list[int]:
        """The cluster's processes (node `name`'s, running `command`): those with the mark in
        their environment, and, for the whole cluster, those with a file open in its temp
        dir (a Ray worker that renamed itself, `ray::…`, wrote its title over its
        environment)."""
        wanted = f"{MARK}={self.mark}:{name or ''}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                environ = (entry / "environ").read_bytes().split(b"\0")
                ours = any(v.startswith(wanted) for v in environ)
                if not ours and name is None:
                    ours = any(self._in_temp(fd) for fd in (entry / "fd").iterdir())
                if ours and command in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
        return found

    def _in_temp(self, fd: Path) -> bool:
        with contextlib.suppress(OSError):
            return os.readlink(fd).startswith(f"{self.temp}/")
        return False

    def kill(self, name: str | None = None, command: bytes = b"") -> None:
        """SIGKILL them, again until none is left (a dying raylet's workers may still start
        a process or two)."""
        deadline = time.monotonic() + 30
        while (found := self.processes(name, command)) and time.monotonic() < deadline:
            for pid in found:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
            if command:  # one process of the node, not all that is left of it
                return


@pytest.fixture(scope="module", params=["gcs", "ray-client"])
def joined(request: pytest.FixtureRequest, data_dir: Path) -> Iterator[tuple[Server, OperatorsRay]]:
    """The front joins by the GCS address (as on one of the cluster's nodes), and again by
    Ray Client (`ray://`, as from outside the cluster)."""
    require_runtime("namespaces")
    directory = SERVER_DIR.with_name(f"{SERVER_DIR.name}-joined-{request.param}")
    nodes = directory / "nodes"
    # Each node keeps its own built images, as on machines of their own; the base image,
    # made once here, they share (it would take each a minute to make).
    shared = data_dir / "images"
    ImageStore(shared).resolve("debian")
    for name in SCOPES:
        (nodes / name / "images").mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            (nodes / name / "images" / "debian").symlink_to(shared / "debian")
    key = directory / "at-rest.key"
    KeyRing(path=key, create=True).current  # noqa: B018 (made on first use)
    with contextlib.ExitStack() as stack:
        postgres = stack.enter_context(running_postgres())
        store = postgres.database()
        ray = OperatorsRay({STORE_ENV: store, KEY_ENV: str(key)})
        stack.callback(shutil.rmtree, ray.temp, ignore_errors=True)
        stack.callback(lambda: asyncio.run(_end_leftovers(nodes, key)))
        stack.callback(ray.kill)
        ray.add("j0", head=True)
        joins = ray.address if request.param == "gcs" else f"ray://127.0.0.1:{ray.client_port}"
        front = start_server(
            directory, data_dir / "images", "--cluster", joins,
            "--database-url", store, "--at-rest-key", str(key),
            start_timeout=240,
        )  # fmt: skip
        stack.callback(front.stop)
        yield front, ray


async def _end_leftovers(nodes: Path, key: Path) -> None:
    for name, scope in SCOPES.items():
        if (nodes / name).is_dir():
            async with Engine(
                nodes / name, scope=HostScope(scope), at_rest_key=key, boot_images=False
            ):
                pass


def _states(front: Server) -> dict[str, str]:
    with front.client() as admin:
        return {node.name: node.state for node in admin.nodes()}


def test_nodes_join_serve_tls_and_a_sandbox_moves_between_them(
    joined: tuple[Server, OperatorsRay],
) -> None:
    require_runtime("gvisor")
    front, ray = joined
    nodes = front.data_dir / "nodes"
    assert _states(front) == {"j0": "ready"}
    ray.add("j1")  # a node that joins after the front started
    wait_until(lambda: _states(front) == {"j0": "ready", "j1": "ready"}, "j1 joins", 180)
    with front.client() as admin:
        listed = {node.name: node for node in admin.nodes()}
    assert (listed["j0"].scope, listed["j1"].scope) == (10, 11)
    # Each node serves TLS from its own CA: a client that does not trust it is refused.
    banner = (front.data_dir / "nodes" / "j0" / "server.log").read_text()
    node_url = banner[banner.index("serves on https://") :].split()[2]  # on its Ray address
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{node_url}/healthz", verify=ssl.create_default_context())
    key = front.new_key("joined")
    auth = {"Authorization": f"Bearer {key}"}
    with front.client(key) as tenant:
        here, there = (_on_node(front, key, tenant, node, 1)[0] for node in ("j0", "j1"))
        try:
            for sandbox, node in ((here, "j0"), (there, "j1")):
                assert sandbox.info().node == node
                assert sandbox.run("echo through the front").stdout == "through the front\n"
                seen: list[bytes] = []  # streamed over a WebSocket, relayed over TLS
                assert sandbox.exec(cmd="echo streamed", on_stdout=seen.append).wait() == 0
                assert b"".join(seen) == b"streamed\n"
        finally:
            here.terminate()
            there.terminate()
        # An image built through the front is on the node that built it only; a running
        # gVisor sandbox of it moves to the other node (its memory copied through the front,
        # over TLS at both ends, and the image with it) and counts on there.
        built, made = (
            Image.debian_slim().run_commands(f"echo {word} > /etc/built").build(client=tenant)
            for word in ("moved", "made")
        )
        origin, other = _holder_and_not(nodes, built.id)
        # Listed and found through the front whichever node answers (each has one of them).
        assert {built.id, made.id} <= {image.id for image in tenant.list_images()}
        for image in (built, made):
            found = httpx.get(f"{front.url}/v1/images/{image.id}", headers=auth)
            assert found.status_code == 200 and found.json()["id"] == image.id
        # A create placed on a node that lacks the image gets it there first.
        _, lacking = _holder_and_not(nodes, made.id)
        (fresh,) = _on_node(front, key, tenant, lacking, 1, image=made.id)
        try:
            assert fresh.run("cat /etc/built").stdout == "made\n"
            assert (nodes / lacking / "images" / "built" / f"{made.id}.json").exists()
        finally:
            fresh.terminate()
        moving = _on_node(
            front, key, tenant, origin, 1, runtime="gvisor", image=built.id, timeout=600
        )[0]
        try:
            moving.exec("python3", "-c", COUNTER)
            wait_until(lambda: moving.files.exists("/root/count"), "the counter counts")
            before = count(moving)
            assert moving.move(other).node == other
            wait_until(lambda: count(moving) > before, f"the counter counts on {other}")
            assert (nodes / other / "images" / "built" / f"{built.id}.json").exists()
            assert moving.run("cat /etc/built").stdout == "moved\n"
            # The image's archive is the front's to copy: no tenant or admin may take it.
            archive = f"{front.url}/v1/images/{built.id}/archive"
            for who, code in ((key, "admin_required"), (front.admin_key, "cluster_front_only")):
                taken = httpx.get(archive, headers={"Authorization": f"Bearer {who}"})
                assert (taken.status_code, taken.json()["error"]["code"]) == (403, code)
        finally:
            moving.terminate()


def test_two_fronts_serve_one_cluster_and_share_its_drains(
    joined: tuple[Server, OperatorsRay], data_dir: Path
) -> None:
    """A second front joins the same cluster: it finds the same nodes (their servers are the
    Ray nodes' own, not a front's), reaches sandboxes made through the first, and a drain made
    through one front holds on the other; stopping a front leaves the nodes serving."""
    first, ray = joined
    if "j1" not in _states(first):
        ray.add("j1")
    wait_until(lambda: _states(first) == {"j0": "ready", "j1": "ready"}, "both ready", 180)
    second = start_server(
        first.data_dir.with_name(first.data_dir.name + "-second"), data_dir / "images",
        "--cluster", ray.address, "--database-url", ray.env[STORE_ENV],
        "--at-rest-key", ray.env[KEY_ENV], start_timeout=240,
    )  # fmt: skip
    key = first.new_key("two-fronts")
    try:
        assert _states(second) == {"j0": "ready", "j1": "ready"}
        with first.client(key) as through_first, second.client(key) as through_second:
            (made,) = _on_node(first, key, through_first, "j1", 1)
            again = Sandbox.connect(made.id, client=through_second)
            assert again.run("echo either front").stdout == "either front\n"
            # Moved through the second front, sandboxes are still reached through the first,
            # which last saw them on their old node: commands, a streamed one, files, an end.
            roving = _on_node(first, key, through_first, "j1", 2, runtime="gvisor")
            for sandbox in roving:
                assert sandbox.run("echo on j1").stdout == "on j1\n"
                assert Sandbox.connect(sandbox.id, client=through_second).move("j0").node == "j0"
            assert roving[0].run("echo on j0").stdout == "on j0\n"
            assert roving[0].exec(cmd="exit 7").wait() == 7  # over a WebSocket
            roving[0].files.write("/root/note", "moved")
            assert roving[0].files.read_text("/root/note") == "moved"
            roving[1].terminate()  # the first request about it since it moved
            ended = Sandbox.connect(roving[1].id, client=through_second).info()
            assert (ended.state, ended.end_reason) == ("terminated", "terminated_by_user")
            roving[0].terminate()
            # A drain through the second front holds on the first.
            with second.client() as admin:
                admin.drain_node("j1")
            assert _states(first)["j1"] == "draining"
            refused = httpx.post(
                f"{first.url}/v1/sandboxes", json={"runtime": "namespaces", "node": "j1"},
                headers={"Authorization": f"Bearer {key}"}, timeout=60,
            )  # fmt: skip
            assert refused.status_code == 429, refused.text
            with first.client() as admin:
                admin.drain_node("j1", draining=False)
            assert _states(second)["j1"] == "ready"
            # The nodes are not the first front's: they serve on once it has stopped.
            first.stop()
            try:
                assert again.run("echo still").stdout == "still\n"
            finally:
                first.start()
            made.terminate()
    finally:
        second.stop()


def _holder_and_not(nodes: Path, image: str) -> tuple[str, str]:
    """The node that has built image `image`, and the other one (which must not have it)."""
    held = [n for n in SCOPES if (nodes / n / "images" / "built" / f"{image}.json").exists()]
    assert len(held) == 1, held
    return held[0], next(n for n in SCOPES if n != held[0])


def test_a_killed_node_is_lost_and_joins_again_under_its_name(
    joined: tuple[Server, OperatorsRay],
) -> None:
    front, ray = joined
    if "j1" not in _states(front):
        ray.add("j1")
    wait_until(lambda: _states(front).get("j1") == "ready", "j1 is ready", 180)
    key = front.new_key("joined-loss")
    with front.client(key) as tenant:
        (doomed,) = _on_node(front, key, tenant, "j1", 1)
        ray.kill("j1", b"raylet")
        wait_until(lambda: _states(front)["j1"] == "lost", "j1 is lost", 120)
        wait_until(lambda: doomed.info().end_reason == "node_lost", "its sandbox ends")
        assert _states(front)["j0"] == "ready"
        ray.kill("j1")  # what the killed raylet left of its node
        ray.add("j1")
        wait_until(lambda: _states(front)["j1"] == "ready", "j1 joins again", 180)
        (again,) = _on_node(front, key, tenant, "j1", 1)
        try:
            assert again.run("echo back").stdout == "back\n"
            # What the killed node left running of it was ended when the node came back,
            # and the store still says why it ended.
            assert (doomed.info().state, doomed.info().end_reason) == ("terminated", "node_lost")
            assert doomed.id not in scope_cgroups(SCOPES["j1"])
        finally:
            again.terminate()
