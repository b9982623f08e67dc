"""The front of a cluster: its nodes, their servers, the store they share, and node loss.

The front serves the Corral API over every node's engine (`corral.server.cluster.api`). A
create goes to a node the front picks (`placement`); everything about one sandbox goes to the
node that runs it, HTTP and WebSockets alike, streamed through untouched (the node checks the
key: every node shares the store); the rest goes to any ready node. The node servers are
started and watched by the Ray driver (`corral.server.cluster.agent`), which the front runs
and listens to: a node it reports lost is taken out of placement and its sandboxes end in the
store with the reason `node_lost`.

A local cluster (`local:N`) is started here, and its nodes are named and placed by the front.
A joined one (`auto`, `HOST:PORT`, `ray://HOST:PORT`) is the operator's: its nodes come and go
with the Ray nodes that offer them, name themselves, and serve over TLS from a CA of their own
that the front learns through the agent (`corral.server.cluster.joining`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import secrets
import socket
import ssl
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx

from corral.core.errors import Conflict, CorralError, ServiceUnavailable
from corral.core.models import StateChange
from corral.core.state import EndReason, SandboxState
from corral.engine import Engine, HostScope
from corral.server.cluster.joining import STORE_ENV, logged
from corral.server.cluster.limits import KeyLimits
from corral.server.cluster.local import LocalRay, resource
from corral.server.cluster.locations import Locations
from corral.server.cluster.placement import Node
from corral.server.config import FRONT_KEY_ENV, ServerConfig
from corral.server.events import EventHub
from corral.server.store import FRONT_KEY_PREFIX, Store
from corral.server.webhooks import Webhooks

log = logging.getLogger("corral.cluster")

Evacuate = Callable[["Front", Node], Coroutine[Any, Any, None]]
START_TIMEOUT = 180.0
LIST_TIMEOUT = 30.0  # for a node that answers /healthz to list itself (GET /v1/nodes)
CLEANUP_TIMEOUT = 60.0  # for a lost node's server to die and free its data directory


def _keep(tasks: set[asyncio.Task[None]], work: Coroutine[Any, Any, None]) -> None:
    """Run `work` as a task held in `tasks` until it is done."""
    task = asyncio.create_task(work)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Front:
    """The nodes of a cluster, their servers, and the store they share."""

    def __init__(self, config: ServerConfig, count: int, evacuate: Evacuate) -> None:
        """`evacuate` moves what can move off a draining node (`migration.evacuate`)."""
        self.config = config
        self._evacuate_with = evacuate
        self.directory = config.data_dir / "cluster"
        # A local cluster is the front's to start; a joined one (count 0) is the operator's.
        self.ray = LocalRay(self.directory, count) if count else None
        self.nodes = {
            f"n{index}": Node(f"n{index}", index, f"http://127.0.0.1:{_free_port()}")
            for index in range(count)
        }
        # Joined nodes serve TLS from CAs of their own, trusted here as they join.
        self.trust = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.trust.minimum_version = ssl.TLSVersion.TLSv1_3
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10), verify=self.trust)
        self._joined = asyncio.Event()  # the agent started the nodes there at the start
        self.located = Locations()  # where each sandbox was last seen: a hint
        self.events = EventHub()  # what only the front knows: sandboxes ended with a node
        self._store: Store | None = None
        self._limits: KeyLimits | None = None
        self.webhooks: Webhooks | None = None
        self._key = self._key_id = ""
        self._agent: asyncio.subprocess.Process | None = None
        self._listening: asyncio.Task[None] | None = None
        self._cleanups: set[asyncio.Task[None]] = set()
        self._retries: set[asyncio.Task[None]] = set()  # ending a lost node's sandboxes again
        self._evacuations: dict[str, asyncio.Task[None]] = {}  # by node: moves off it

    @property
    def store(self) -> Store:
        assert self._store is not None, "the front is not started"
        return self._store

    @property
    def limits(self) -> KeyLimits:
        """The per-key limits, checked across every node (`corral.server.cluster.limits`)."""
        assert self._limits is not None, "the front is not started"
        return self._limits

    # -- starting and stopping ---------------------------------------------------------------

    async def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._store = await Store.open(self.config.database, self.config.key_ring())
        self._limits = KeyLimits(self.store, self.config.max_sandboxes_per_key)
        # Sandboxes ended with their node are the front's to tell the webhooks about.
        self.webhooks = Webhooks.for_server(self.store.webhooks, self.config)
        await self.webhooks.start()
        self.events.listeners.append(self.webhooks.publish)
        # Its own key, made afresh at each start under this front's name (any number of
        # fronts may serve one cluster, each with its own).
        name = f"{FRONT_KEY_PREFIX}-{self._front_id()}"
        for key in await self.store.list_keys():
            if key.name in (name, FRONT_KEY_PREFIX) and key.revoked_at is None:
                await self.store.revoke_key(key.id)
        made, self._key = await self.store.create_key(name, front=True)
        self._key_id = made.id
        agent = [sys.executable, "-m", "corral.server.cluster.agent"]
        if self.ray is not None:
            await asyncio.to_thread(self.ray.start)
            agent = self.ray.in_netns(agent)
        log_file = (self.directory / "agent.log").open("ab")
        self._agent = await asyncio.create_subprocess_exec(
            *agent, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log_file
        )
        log_file.close()
        assert self._agent.stdin is not None
        self._agent.stdin.write(json.dumps(self._plan()).encode() + b"\n")
        await self._agent.stdin.drain()
        self._listening = asyncio.create_task(self._listen())
        deadline = time.monotonic() + START_TIMEOUT
        while not self._joined.is_set():
            if time.monotonic() > deadline or self._listening.done():
                await self.close()
                raise ServiceUnavailable(
                    f"the cluster's nodes did not start; see {self.directory}/agent.log and "
                    "each node's server.log",
                    code="cluster_unavailable",
                )
            await asyncio.sleep(0.1)

    def _front_id(self) -> str:
        """This front's id, made once and kept in its data directory."""
        path = self.directory / "front-id"
        with contextlib.suppress(OSError):
            kept = path.read_text().strip()
            if kept.isalnum():
                return kept
        made = secrets.token_hex(6)
        path.write_text(made + "\n")
        return made

    def _plan(self) -> dict[str, Any]:
        """What the agent starts. No secret: the nodes find the front's key in the store, and
        need only know which it is."""
        env = {FRONT_KEY_ENV: self._key_id}
        if self.ray is None:  # the store's URL and the at-rest key: each node's environment's
            join = {"args": self._shared_args(), "data_dir": str(self.config.data_dir / "nodes")}
            return {"address": self.config.ray_address, "env": env, "nodes": [], "join": join}
        return {
            "address": self.ray.address, "env": env, "join": None,
            "nodes": [
                {"name": node.name, "resource": resource(node.index or 0), "argv": self._argv(node)}
                for node in self.nodes.values()
            ],
        }  # fmt: skip

    def node_dir(self, node: Node) -> Path:
        return self.config.data_dir / "nodes" / node.name

    def _argv(self, node: Node) -> list[str]:
        """How a local node's Corral server is started (in the host's network namespace)."""
        assert self.ray is not None and node.index is not None
        data = self.node_dir(node)
        data.mkdir(parents=True, exist_ok=True)
        images = data / "images"
        if not images.exists():  # one machine: the nodes share the built images
            images.symlink_to(self.config.data_dir / "images")
        port = node.url.rsplit(":", 1)[1]
        database = self.config.database
        argv = [
            sys.executable, "-m", "corral", "serve", "--host", "127.0.0.1", "--port", port,
            "--data-dir", str(data), "--host-scope", str(node.index), "--node-name", node.name,
            "--database-url", f"sqlite:///{database}" if isinstance(database, Path) else database,
            "--at-rest-key", str(self.config.key_file), "--no-prepare", *self._shared_args(),
        ]  # fmt: skip
        return logged(self.ray.on_host(argv), data / "server.log")

    def _shared_args(self) -> list[str]:
        """What every node's `corral serve` is given."""
        argv = [
            "--max-sandboxes", str(self.config.max_sandboxes),
            "--max-sandboxes-per-key", str(self.config.max_sandboxes_per_key),
            "--doze-after", str(self.config.doze_after or 0),
            "--log-level", "warning",
        ]  # fmt: skip
        if self.config.default_runtime:
            argv += ["--runtime", self.config.default_runtime]
        if self.config.preview_domain:
            argv += ["--preview-domain", self.config.preview_domain]
        if self.config.start_limit is not None:
            argv += ["--start-limit", str(self.config.start_limit)]
        for _name, template, size in self.config.pools:
            argv += ["--pool", f"{template.runtime}:{template.image}:{size}"]
        return argv

    async def close(self) -> None:
        if self._listening is not None:  # nodes stopped from here on are not lost
            self._listening.cancel()
        if self._agent is not None:
            if self._agent.stdin is not None:
                self._agent.stdin.close()  # the agent stops the node servers, then itself
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._agent.wait(), 120)
            self._agent = None
        for task in (*self._evacuations.values(), *self._retries):
            task.cancel()
        every = (*self._retries, *self._cleanups, *self._evacuations.values())
        await asyncio.gather(*every, return_exceptions=True)
        if self.ray is not None:
            await asyncio.to_thread(self.ray.stop)
        await self.http.aclose()
        if self.webhooks is not None:
            await self.webhooks.close()
        if self._store is not None:
            await self._store.close()
            self._store = None

    # -- the nodes ---------------------------------------------------------------------------

    async def _listen(self) -> None:
        assert self._agent is not None and self._agent.stdout is not None
        async for line in self._agent.stdout:
            try:
                said = json.loads(line)
                if said.get("state") == "joined":
                    self._joined.set()
                    continue
                node = self._joining(said) if "url" in said else self.nodes[said["node"]]
            except (ValueError, KeyError, TypeError, AttributeError, ssl.SSLError):
                log.warning("the cluster agent said %r", line[:200])
                continue
            try:  # in order, one at a time: a node's states never interleave
                if said.get("state") == "up":
                    await self._until_healthy(node)
                elif said.get("state") == "lost" and node.state not in ("losing", "lost"):
                    await self.lost(node, str(said.get("detail") or "Ray lost it"))
            except Exception:  # the store, say: the next word about the nodes is still heard
                log.exception("handling the cluster agent's %r failed", line[:200])

    def _joining(self, said: dict[str, Any]) -> Node:
        """A joined node that is up, new or back: where it serves, and the CA to trust."""
        name, url, scope = str(said["node"]), str(said["url"]), said["scope"]
        if not url.startswith("https://") or not (scope is None or isinstance(scope, int)):
            raise ValueError(f"no HTTPS URL or scope for node {name}")
        self.trust.load_verify_locations(cadata=str(said["ca"]))
        node = self.nodes.setdefault(name, Node(name, scope, url))
        node.url, node.index, node.state, node.detail = url, scope, "starting", None
        log.info("node %s joined at %s", name, url)
        return node

    async def _until_healthy(self, node: Node) -> None:
        deadline, listed_by = time.monotonic() + START_TIMEOUT, None
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if (await self.http.get(f"{node.url}/healthz", timeout=2)).status_code == 200:
                    listed_by = listed_by or time.monotonic() + LIST_TIMEOUT
                    if await self.describe(node) is None:  # slow or busy, or foreign
                        if await self._refuses_front(node):
                            why = f"it does not share the front's store (check its {STORE_ENV})"
                            await self.lost(node, why)
                            return
                        if time.monotonic() > listed_by:
                            await self.lost(node, "its Corral server did not list itself")
                            return
                        await asyncio.sleep(0.2)
                        continue
                    node.state = "ready"
                    log.info("node %s is ready at %s", node.name, node.url)
                    if node.draining:  # drained before a restart: what is left moves now
                        self._evacuate(node)
                    return
            await asyncio.sleep(0.2)
        await self.lost(node, "its Corral server did not answer")

    async def _refuses_front(self, node: Node) -> bool:
        """Whether node `node` refuses the front's admin key: it does not know it, so it does
        not share the front's store. A timeout or a 5xx is not that."""
        answer = await self.http.get(
            f"{node.url}/v1/nodes", headers=self.admin_headers(), timeout=5
        )
        return answer.status_code in (401, 403)

    async def lost(self, node: Node, detail: str) -> None:
        """Node `node` is gone: no more placement there, and its sandboxes end (`node_lost`).
        It is listed lost once they have ended in the store (`unreachable` until then, while
        a failing store is tried again), so whoever sees the node lost finds them ended."""
        node.state, node.detail = "losing", detail
        log.warning("node %s is lost: %s", node.name, detail)
        why = f"node {node.name} was lost: {detail}"
        try:
            await self._end_sandboxes_of(node, why)
            node.state = "lost"
        except Exception:
            log.exception("ending lost node %s's sandboxes in the store failed", node.name)
            _keep(self._retries, self._end_again(node, why))
        if self.ray is not None:  # this machine's: what they left running ends too
            _keep(self._cleanups, self._clean_up(node, why))

    async def _end_again(self, node: Node, why: str) -> None:
        """End a lost node's sandboxes in the store, tried again until it works (the node
        is listed lost then) or the node joins again (its server ends them as it starts)."""
        delay = 1.0
        while node.state == "losing":
            await asyncio.sleep(delay)
            try:
                await self._end_sandboxes_of(node, why)
            except Exception as exc:
                log.warning("ending lost node %s's sandboxes failed again: %s", node.name, exc)
                delay = min(2 * delay, 30.0)
                continue
            if node.state == "losing":
                node.state = "lost"

    async def _end_sandboxes_of(self, node: Node, why: str) -> None:
        """End in the store (and say so on the key's stream and webhooks) what still lives
        on `node`."""
        if self.webhooks is not None:
            await self.webhooks.sync()
        now = time.time()
        for listed in await self.store.live_sandboxes():
            found = await self.store.get_sandbox(listed.id) if listed.node == node.name else None
            if found is None:
                continue
            info = found[1]  # as it is now (its history)
            ended = replace(
                info,
                state=SandboxState.TERMINATED,
                ended_at=now,
                end_reason=EndReason.NODE_LOST,
                end_detail=why,
                expires_at=None,
                history=(*info.history, StateChange(SandboxState.TERMINATED, now, "node_lost")),
            )
            # Only while it is still live there: moved off the node or ended meanwhile, it stays.
            if await self.store.update_sandbox(ended, live_on=node.name):
                self.events.publish(found[0], ended)

    async def _clean_up(self, node: Node, why: str) -> None:
        """On this machine (a local cluster), what a lost node's sandboxes left running is
        ended by an engine on its data directory, once the node's server is gone (it holds the
        directory until it dies). A create that the dying server finished after the node was
        reported lost is then ended in the store too: none is left running where nothing runs
        it."""
        deadline = time.monotonic() + CLEANUP_TIMEOUT
        while True:
            try:
                async with Engine(
                    self.node_dir(node),
                    scope=HostScope(node.index or 0),
                    at_rest_key=self.config.key_file,
                    boot_images=False,
                    node=node.name,
                ):
                    pass
                break
            except Conflict as exc:  # its server has not died yet
                if exc.code != "data_dir_in_use" or time.monotonic() > deadline:
                    log.error("could not clean up after node %s: %s", node.name, exc)
                    break
                await asyncio.sleep(0.5)
            except (CorralError, OSError) as exc:
                log.error("could not clean up after node %s: %s", node.name, exc)
                break
        await self._end_sandboxes_of(node, why)

    async def drain(self, node: Node, draining: bool) -> None:
        """Stop (or start again) placing sandboxes on `node`, and move away those that can
        move (`migration.evacuate`). The node keeps it (across restarts, for every front)."""
        try:
            marked = await self.http.request(
                "POST" if draining else "DELETE",
                f"{node.url}/v1/nodes/{node.name}/drain",
                headers=self.admin_headers(),
                timeout=30,
            )
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(
                f"node {node.name} did not answer ({type(exc).__name__}); retry",
                code="node_unavailable",
            ) from None
        if marked.status_code != 200:
            raise ServiceUnavailable(
                f"node {node.name} refused to drain ({marked.status_code}): {marked.text[:200]}",
                code="node_unavailable",
            )
        node.draining, node.drains = draining, node.drains + 1
        if draining:
            self._evacuate(node)

    def _evacuate(self, node: Node) -> None:
        running = self._evacuations.get(node.name)
        if running is None or running.done():
            task = asyncio.create_task(self._evacuate_with(self, node))
            self._evacuations[node.name] = task

    def ready(self) -> list[Node]:
        return [node for node in self.nodes.values() if node.state == "ready"]

    def urls(self) -> dict[str, str]:
        """Every ready node's URL, by name."""
        return {node.name: node.url for node in self.ready()}

    def any_nodes(self) -> list[Node]:
        """Every ready node, in a random order (the first that answers serves)."""
        ready = self.ready()
        random.shuffle(ready)
        return ready

    async def route(
        self, sandbox_id: str | None, *, fresh: bool = False
    ) -> tuple[list[Node], bool]:
        """Where a request about `sandbox_id` goes: its node (remembered, or `fresh` from the
        store), and False; else any ready one, and True (they answer from the store)."""
        name = None
        if sandbox_id is not None:
            name = await self.located.lookup(self.store, sandbox_id, fresh=fresh)
        ready = self.urls()
        if sandbox_id is not None and not fresh and name is not None and name not in ready:
            # The one remembered is gone: it may have moved, as another front knows.
            name = await self.located.lookup(self.store, sandbox_id, fresh=True)
        return ([self.nodes[name]], False) if name in ready else (self.any_nodes(), True)

    def admin_headers(self) -> dict[str, str]:
        """The front's own admin key, which every node knows (the shared store)."""
        return {"Authorization": f"Bearer {self._key}"}

    async def describe(self, node: Node) -> dict[str, Any] | None:
        """Node `node`'s own view of itself (GET /v1/nodes), None if it does not answer."""
        drains = node.drains
        try:
            answer = await self.http.get(
                f"{node.url}/v1/nodes", headers=self.admin_headers(), timeout=5
            )
            listed = answer.json() if answer.status_code == 200 else []
        except (httpx.HTTPError, ValueError):
            return None
        if not listed:
            return None
        seen: dict[str, Any] = listed[0]
        if node.drains != drains:  # drained or undrained here since it was asked: the front's
            return {**seen, "state": "draining" if node.draining else "ready"}
        draining = seen.get("state") == "draining"  # set there, by any front
        if draining and not node.draining and node.state == "ready":
            self._evacuate(node)  # drained through another front, or before a restart
        node.draining = draining
        return seen
