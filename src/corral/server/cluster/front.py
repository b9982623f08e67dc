"""The front of a cluster: the Corral API over every node's engine.

A create goes to a node the front picks (`place`); everything about one sandbox goes to the
node that runs it, HTTP and WebSockets alike, streamed through untouched (the node checks the
key: every node shares the store); the rest goes to any ready node. The node servers are
started and watched by the Ray driver (`corral.server.cluster.agent`), which the front runs
and listens to: a node it reports lost is taken out of placement and its sandboxes end in the
store with the reason `node_lost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from corral.core.errors import CorralError, LimitReached, ServiceUnavailable
from corral.core.models import StateChange
from corral.core.state import EndReason, SandboxState
from corral.engine import Engine, HostScope
from corral.server.cluster import gather, placement
from corral.server.cluster.events import merged_events
from corral.server.cluster.local import LocalRay, resource
from corral.server.cluster.placement import Node
from corral.server.cluster.sockets import relay
from corral.server.config import ServerConfig
from corral.server.errors import error_response
from corral.server.events import EventHub
from corral.server.store import Store

log = logging.getLogger("corral.cluster")

FRONT_KEY_NAME = "corral-front"  # the front's own admin key, made afresh at each start
START_TIMEOUT = 180.0
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
# Not copied between the client's connection and the node's.
HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "upgrade", "host", "te"})


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Front:
    """The nodes of a local cluster, their servers, and the store they share."""

    def __init__(self, config: ServerConfig, count: int) -> None:
        self.config = config
        self.directory = config.data_dir / "cluster"
        self.ray = LocalRay(self.directory, count)
        self.nodes = {
            f"n{index}": Node(f"n{index}", index, f"http://127.0.0.1:{_free_port()}")
            for index in range(count)
        }
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10))
        self.located: dict[str, str] = {}  # sandbox id -> node name, for those made here
        self.events = EventHub()  # what only the front knows: sandboxes ended with a node
        self._store: Store | None = None
        self._key = ""
        self._agent: asyncio.subprocess.Process | None = None
        self._listening: asyncio.Task[None] | None = None
        self._cleanups: set[asyncio.Task[None]] = set()

    @property
    def store(self) -> Store:
        assert self._store is not None, "the front is not started"
        return self._store

    # -- starting and stopping ---------------------------------------------------------------

    async def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._store = await Store.open(self.config.database, self.config.key_ring())
        for key in await self.store.list_keys():
            if key.name == FRONT_KEY_NAME and key.revoked_at is None:
                await self.store.revoke_key(key.id)
        _, self._key = await self.store.create_key(FRONT_KEY_NAME, admin=True)
        await asyncio.to_thread(self.ray.start)
        agent = self.ray.in_netns([sys.executable, "-m", "corral.server.cluster.agent"])
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
        while any(node.state == "starting" for node in self.nodes.values()):
            if time.monotonic() > deadline or self._listening.done():
                await self.close()
                raise ServiceUnavailable(
                    f"the cluster's nodes did not start; see {self.directory}/agent.log and "
                    "each node's server.log",
                    code="cluster_unavailable",
                )
            await asyncio.sleep(0.1)

    def _plan(self) -> dict[str, Any]:
        return {
            "address": self.ray.address,
            "nodes": [
                {"name": node.name, "resource": resource(node.index), "argv": self._argv(node),
                 "env": {"CORRAL_API_KEY": self._key}}
                for node in self.nodes.values()
            ],
        }  # fmt: skip

    def node_dir(self, node: Node) -> Path:
        return self.config.data_dir / "nodes" / node.name

    def _argv(self, node: Node) -> list[str]:
        """How node `node`'s Corral server is started (in the host's network namespace)."""
        data = self.node_dir(node)
        data.mkdir(parents=True, exist_ok=True)
        images = data / "images"
        if not images.exists():  # one machine: the nodes share the built images
            images.symlink_to(self.config.data_dir / "images")
        database = self.config.database
        port = node.url.rsplit(":", 1)[1]
        argv = [
            sys.executable, "-m", "corral", "serve", "--host", "127.0.0.1", "--port", port,
            "--data-dir", str(data), "--host-scope", str(node.index), "--node-name", node.name,
            "--database-url", f"sqlite:///{database}" if isinstance(database, Path) else database,
            "--at-rest-key", str(self.config.key_file), "--no-prepare",
            "--max-sandboxes", str(self.config.max_sandboxes),
            "--max-sandboxes-per-key", str(self.config.max_sandboxes_per_key),
            "--log-level", "warning",
        ]  # fmt: skip
        if self.config.default_runtime:
            argv += ["--runtime", self.config.default_runtime]
        for _name, template, size in self.config.pools:
            argv += ["--pool", f"{template.runtime}:{template.image}:{size}"]
        log_path = data / "server.log"
        return ["sh", "-c", 'exec "$@" >>"$0" 2>&1', str(log_path), *self.ray.on_host(argv)]

    async def close(self) -> None:
        if self._listening is not None:  # nodes stopped from here on are not lost
            self._listening.cancel()
        if self._agent is not None:
            if self._agent.stdin is not None:
                self._agent.stdin.close()  # the agent stops the node servers, then itself
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._agent.wait(), 120)
            self._agent = None
        await asyncio.gather(*self._cleanups, return_exceptions=True)
        await asyncio.to_thread(self.ray.stop)
        await self.http.aclose()
        if self._store is not None:
            await self._store.close()
            self._store = None

    # -- the nodes ---------------------------------------------------------------------------

    async def _listen(self) -> None:
        assert self._agent is not None and self._agent.stdout is not None
        async for line in self._agent.stdout:
            try:
                said = json.loads(line)
                node = self.nodes[said["node"]]
            except (ValueError, KeyError, TypeError):
                log.warning("the cluster agent said %r", line[:200])
                continue
            if said.get("state") == "up":
                await self._until_healthy(node)
            elif said.get("state") == "lost" and node.state != "lost":
                await self.lost(node, str(said.get("detail") or "Ray lost it"))

    async def _until_healthy(self, node: Node) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if (await self.http.get(f"{node.url}/healthz", timeout=2)).status_code == 200:
                    node.state = "ready"
                    log.info("node %s is ready at %s", node.name, node.url)
                    return
            await asyncio.sleep(0.2)
        await self.lost(node, "its Corral server did not answer")

    async def lost(self, node: Node, detail: str) -> None:
        """Node `node` is gone: no more placement there, and its sandboxes end (`node_lost`)."""
        node.state, node.detail = "lost", detail
        log.warning("node %s is lost: %s", node.name, detail)
        now = time.time()
        why = f"node {node.name} was lost: {detail}"
        for info in await self.store.live_sandboxes():
            found = await self.store.get_sandbox(info.id) if info.node == node.name else None
            if found is None:
                continue
            ended = replace(
                info,
                state=SandboxState.TERMINATED,
                ended_at=now,
                end_reason=EndReason.NODE_LOST,
                end_detail=why,
                expires_at=None,
                history=(*info.history, StateChange(SandboxState.TERMINATED, now, "node_lost")),
            )
            await self.store.update_sandbox(ended)
            self.events.publish(found[0], ended)
        task = asyncio.create_task(self._clean_up(node))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _clean_up(self, node: Node) -> None:
        """On this machine, what a lost node's sandboxes left running is ended by an engine on
        its data directory (the store already says how they ended)."""
        try:
            async with Engine(
                self.node_dir(node),
                scope=HostScope(node.index),
                at_rest_key=self.config.key_file,
                boot_images=False,
                node=node.name,
            ):
                pass
        except (CorralError, OSError) as exc:
            log.error("could not clean up after node %s: %s", node.name, exc)

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

    async def nodes_for(self, sandbox_id: str | None) -> list[Node]:
        """Where a request goes: the node that runs `sandbox_id`, else any ready one (they
        answer from the store, as for a sandbox of a lost node)."""
        name = self.located.get(sandbox_id or "")
        if name is None and sandbox_id and sandbox_id.startswith("sb-"):
            found = await self.store.get_sandbox(sandbox_id)
            name = found[1].node if found else None
        node = self.nodes.get(name or "")
        return [node] if node is not None and node.state == "ready" else self.any_nodes()

    async def describe(self, node: Node) -> dict[str, Any] | None:
        """Node `node`'s own view of itself (GET /v1/nodes), None if it does not answer."""
        try:
            answer = await self.http.get(
                f"{node.url}/v1/nodes", headers={"Authorization": f"Bearer {self._key}"}, timeout=5
            )
            listed = answer.json() if answer.status_code == 200 else []
        except (httpx.HTTPError, ValueError):
            return None
        return listed[0] if listed else None


# -- the API ---------------------------------------------------------------------------------


def _headers(raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(name, value) for name, value in raw if name.decode("latin-1").lower() not in HOP]


async def forward(
    front: Front, nodes: list[Node], request: Request, body: bytes | None = None
) -> Response:
    """`request` sent on to the first of `nodes` that takes the connection (one that refuses
    it has read nothing of the request; a read goes on to the next whatever happened), and
    its answer streamed back."""
    if not nodes:
        return error_response(
            ServiceUnavailable("no node of the cluster is ready; retry", code="no_node_ready")
        )
    path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    content: Any = body if body is not None else request.stream()
    for node in nodes:
        sent = front.http.build_request(
            request.method, node.url + path, headers=_headers(request.headers.raw), content=content
        )
        try:
            answer = await front.http.send(sent, stream=True)
            break
        except httpx.ConnectError:
            continue  # down, and not yet reported lost: the next
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            if request.method in ("GET", "HEAD"):  # it died under us; a read may go again
                continue
            return _unavailable(node, exc)
        except httpx.HTTPError as exc:
            return _unavailable(node, exc)
    else:
        return _unavailable(node, None)
    return StreamingResponse(
        answer.aiter_raw(),
        status_code=answer.status_code,
        headers={k: v for k, v in answer.headers.items() if k.lower() not in HOP},
        background=BackgroundTask(answer.aclose),
    )


def _unavailable(node: Node, exc: Exception | None) -> Response:
    why = f" ({type(exc).__name__})" if exc is not None else ""
    return error_response(
        ServiceUnavailable(f"node {node.name} did not answer{why}; retry", code="node_unavailable")
    )


def _sandbox_of(path: str) -> str | None:
    parts = path.strip("/").split("/")
    if parts[:1] == ["v2"]:  # E2B's control API, /v2/sandboxes/{id}…, as /sandboxes/{id}…
        parts = parts[1:]
    for start in (["v1", "sandboxes"], ["sandboxes"]):
        rest = parts[len(start) :]
        if parts[: len(start)] == start and rest and rest[0].startswith("sb-"):
            return rest[0]
    if len(parts) >= 2 and parts[0] == "preview":
        return parts[1]
    return None


def create_front_app(config: ServerConfig) -> Starlette:
    """The front's ASGI app: it starts the cluster on startup and stops it on shutdown."""
    front = Front(config, config.cluster_nodes)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.front = front
        await front.start()
        try:
            yield
        finally:
            await front.close()

    return Starlette(
        routes=[
            Route("/healthz", _healthz),
            Route("/v1/nodes", _nodes),
            Route("/v1/sandboxes", _create, methods=["POST"]),
            Route("/v1/events", _events),
            Route("/metrics", _metrics),
            Route("/v1/metrics/sandboxes", _latest_metrics),
            Route("/{path:path}", _anything, methods=METHODS),
            WebSocketRoute("/{path:path}", _socket),
        ],
        lifespan=lifespan,
    )


def _front(request: Request | WebSocket) -> Front:
    front: Front = request.app.state.front
    return front


async def _healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok", "nodes": len(_front(request).ready())})


async def _create(request: Request) -> Response:
    front, body = _front(request), await request.body()
    try:
        chosen = await placement.choose(front.nodes, front.describe, body)
        if chosen is None:  # not JSON, or not an object: a node says what is wrong
            return await forward(front, front.any_nodes(), request, body)
    except CorralError as error:
        return error_response(error)
    nodes, sent = chosen
    answer: Response | None = None
    for node in nodes:  # the next when one is full
        answer = await _create_on(front, node, request, sent)
        if answer.status_code != 429:
            break
    assert answer is not None
    return answer


async def _nodes(request: Request) -> Response:
    front = _front(request)
    probe = await forward(front, front.any_nodes(), request)  # the caller must be an admin
    if probe.status_code != 200:
        return probe
    if isinstance(probe, StreamingResponse) and probe.background is not None:
        await probe.background()
    described = await asyncio.gather(*(front.describe(n) for n in front.nodes.values()))
    listed = [
        placement.node_entry(node, seen)
        for node, seen in zip(front.nodes.values(), described, strict=True)
    ]
    return JSONResponse(listed)


async def _events(request: Request) -> Response:
    """Every node's events for the caller (or only its node's, with `sandbox_id`), merged."""
    front, sandbox_id = _front(request), request.query_params.get("sandbox_id")
    try:
        nodes = await front.nodes_for(sandbox_id) if sandbox_id else front.ready()
    except CorralError as error:
        return error_response(error)
    return await merged_events(
        front.http, [node.url for node in nodes], request, _headers(request.headers.raw),
        store=front.store, hub=front.events,
    )  # fmt: skip


async def _metrics(request: Request) -> Response:
    """Every ready node's Prometheus metrics, each sample labelled with its `node`."""
    front = _front(request)
    answers = await gather.ask_all(
        front.http, front.urls(), "/metrics", _headers(request.headers.raw)
    )
    if isinstance(answers, Response):
        return answers
    texts = {name: answer.text for name, answer in answers.items()}
    return Response(gather.labelled(texts), media_type=PROMETHEUS)


async def _latest_metrics(request: Request) -> Response:
    """The caller's sandboxes' newest usage samples, from every ready node."""
    front = _front(request)
    answers = await gather.ask_all(
        front.http, front.urls(), request.url.path, _headers(request.headers.raw)
    )
    return answers if isinstance(answers, Response) else gather.joined(answers)


async def _anything(request: Request) -> Response:
    front = _front(request)
    try:
        nodes = await front.nodes_for(_sandbox_of(request.url.path))
    except CorralError as error:
        return error_response(error)
    return await forward(front, nodes, request)


async def _socket(websocket: WebSocket) -> None:
    front = _front(websocket)
    try:
        nodes = await front.nodes_for(_sandbox_of(websocket.url.path))
    except CorralError:
        nodes = []
    if not nodes:
        await websocket.close(code=1013)
        return
    await relay(nodes[0].url, websocket.scope, websocket.receive, websocket.send)


async def _create_on(front: Front, node: Node, request: Request, body: bytes) -> Response:
    """Create on `node`; the answer is read whole (it is small) to learn the new id's node."""
    target = node.url + request.url.path + (f"?{request.url.query}" if request.url.query else "")
    headers = [(k, v) for k, v in _headers(request.headers.raw) if k.lower() != b"content-length"]
    try:
        answer = await front.http.request("POST", target, headers=headers, content=body)
    except httpx.HTTPError as exc:
        return error_response(
            LimitReached(
                f"node {node.name} did not answer ({type(exc).__name__}); retry",
                code="node_unavailable",
            )
        )
    with contextlib.suppress(ValueError, KeyError, TypeError):
        made = answer.json()
        front.located[made["id"]] = made.get("node") or node.name
    kept = HOP | {"content-length", "content-encoding"}  # the body is read, decoded
    return Response(
        answer.content,
        status_code=answer.status_code,
        headers={k: v for k, v in answer.headers.items() if k.lower() not in kept},
    )
