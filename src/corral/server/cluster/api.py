"""The front's HTTP API: the Corral API over every node (see `corral.server.cluster.front`).

Creates are placed (`placement`); what names a sandbox goes to its node (`proxy`); snapshots
are found, listed and copied across the nodes (`moves`), and so are built images (`images`);
the views that span the cluster (nodes, events, metrics) are gathered from every node.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from corral.core.errors import CorralError, LimitReached, ServiceUnavailable
from corral.core.quota import Quota
from corral.engine.checkpoints import MAX_FORK
from corral.server.cluster import gather, images, limits, migration, moves, placement
from corral.server.cluster.events import merged_events
from corral.server.cluster.front import Front
from corral.server.cluster.placement import Node
from corral.server.cluster.proxy import (
    FROM_STORE,
    create_on,
    forward,
    headers,
    previewed,
    sandbox_of,
    small_body,
)
from corral.server.cluster.sockets import relay
from corral.server.config import ServerConfig
from corral.server.errors import error_response

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
CREATES = ("/v1/sandboxes", "/sandboxes", "/v2/sandboxes")


def create_front_app(config: ServerConfig) -> Starlette:
    """The front's ASGI app: it starts the cluster on startup and stops it on shutdown."""
    front = Front(config, config.cluster_nodes, migration.evacuate)

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
            Route("/v1/nodes/{name}/drain", _drain, methods=["POST", "DELETE"]),
            # Creates, Corral's and E2B's (whose answers name the sandbox `sandboxID`).
            *(Route(path, _create, methods=["POST"]) for path in CREATES),
            Route("/v1/sandboxes/{sandbox_id}/fork", _fork, methods=["POST"]),
            Route("/v1/sandboxes/{sandbox_id}/move", _move, methods=["POST"]),
            Route("/v1/snapshots", _each_once, methods=["GET"]),
            Route("/v1/snapshots/{ref}", _snapshot, methods=["GET", "DELETE"]),
            Route("/v1/images", _each_once, methods=["GET"]),  # each node lists what it has
            Route("/v1/images/{ref}", _image, methods=["GET"]),
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
        nodes, sent = chosen
        asks = limits.asked(json.loads(sent))
        held = await front.limits.reserve(request.headers.get("authorization"), asks, 1)
        try:
            answer = await _placed(front, request, nodes, sent)
        except BaseException:
            front.limits.failed(held)
            raise
    except CorralError as error:
        return error_response(error)
    front.limits.made(held, _made(answer))
    return answer


async def _placed(front: Front, request: Request, nodes: list[Node], sent: bytes) -> Response:
    """The create on the first of `nodes` that can take it (the next when one is full)."""
    snapshot = await moves.holder_first(front, request, sent, nodes)
    authorization = request.headers.get("authorization")
    # A local cluster's nodes share their images: only a joined one's may lack one.
    joined = front.ray is None and snapshot is None
    image = await images.named(front, authorization, json.loads(sent)) if joined else None
    answer: Response | None = None
    for node in nodes:
        if snapshot is not None and node is not snapshot[1]:
            await moves.copy(front, snapshot[0], snapshot[1], node)
        elif image is not None:
            await images.bring(front, image, node)
        answer = await create_on(front, node, request, sent)
        if answer.status_code != 429:
            break
    assert answer is not None
    return answer


def _made(answer: Response) -> list[str]:
    """The ids of the sandboxes a create or fork answer says were made (Corral's or E2B's)."""
    body = getattr(answer, "body", None)  # none in an answer streamed through
    if answer.status_code not in (200, 201) or not isinstance(body, bytes):
        return []
    try:
        made = json.loads(body)
        entries = made if isinstance(made, list) else [made]
        return [str(entry.get("id") or entry["sandboxID"]) for entry in entries]
    except (ValueError, KeyError, TypeError, AttributeError):
        return []


async def _fork(request: Request) -> Response:
    """A fork on the sandbox's node, or, with `"node"` in the body, onto that node; counted
    against the key's limits across the cluster (its number of sandboxes)."""
    front, body = _front(request), await request.body()
    try:
        asked = json.loads(body or b"{}")
    except ValueError:
        asked = None  # a node says what is wrong with it
    count = asked.get("count") if isinstance(asked, dict) else None
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_FORK:
        count = 0  # the node refuses it
    try:
        held = await front.limits.reserve(request.headers.get("authorization"), Quota(), count)
    except CorralError as error:
        return error_response(error)
    try:
        answer = await _forked(front, request, body, asked)
    except BaseException:
        front.limits.failed(held)
        raise
    front.limits.made(held, _made(answer))
    return answer


async def _forked(front: Front, request: Request, body: bytes, asked: Any) -> Response:
    sandbox_id = request.path_params["sandbox_id"]
    wanted = asked.pop("node", None) if isinstance(asked, dict) else None
    try:
        # Onto a named node: which node it runs on decides how, so that is the store's word.
        nodes, elsewhere = await front.route(sandbox_id, fresh=wanted is not None)
        if wanted is None or elsewhere:  # (its node is not ready: one says what is wrong)
            return await forward(
                front, nodes, request, body, sandbox=sandbox_id, from_store=elsewhere
            )
        target = placement.named(front.nodes, wanted)
        if placement.state_of(target) != "ready":
            raise LimitReached(
                f"node {target.name} is {placement.state_of(target)}; fork onto another, or "
                "retry shortly",
                code="no_node_available",
            )
        if nodes[0] is target:
            sent = json.dumps(asked).encode()
            return await forward(front, nodes, request, sent, sandbox=sandbox_id)
        return await moves.fork_across(
            front, request, sandbox_id, source=nodes[0], target=target, count=asked.get("count")
        )
    except CorralError as error:
        return error_response(error)


async def _move(request: Request) -> Response:
    """Move one of the caller's sandboxes to another node (`"node"`, or the front picks),
    keeping its id, memory and files (see `migration`)."""
    front, body = _front(request), await request.body()
    sandbox_id = request.path_params["sandbox_id"]
    try:
        asked = json.loads(body or b"{}")
    except ValueError:
        asked = None
    if not isinstance(asked, dict) or set(asked) - {"node"}:
        # The sandbox's node says what is wrong (another refuses it, naming that node).
        return await forward(front, front.any_nodes(), request, body, sandbox=sandbox_id)
    try:
        nodes, elsewhere = await front.route(sandbox_id, fresh=True)  # from the truth
        if not nodes:
            return await forward(front, nodes, request, body)  # no node answers
        sent = moves.asked(request) + ([(FROM_STORE.encode(), b"1")] if elsewhere else [])
        seen = await front.http.get(f"{nodes[0].url}/v1/sandboxes/{sandbox_id}", headers=sent)
        if seen.status_code != 200:  # not the caller's, or no such sandbox
            return moves.relayed(seen)
        info = _sandbox_seen(seen, nodes[0])
        source = front.nodes.get(info.get("node") or "")
        if source is None or source.state != "ready":
            raise LimitReached(
                f"sandbox {sandbox_id}'s node is not ready; retry shortly", code="node_unavailable"
            )
        target = await migration.target_for(front, info["runtime"], source, asked.get("node"))
        return JSONResponse(await migration.move(front, sandbox_id, source, target))
    except migration.MoveFailed as failed:
        return moves.relayed(failed.answer)
    except CorralError as error:
        return error_response(error)
    except httpx.HTTPError as exc:
        return error_response(migration.unanswered(nodes[0], exc))


def _sandbox_seen(seen: httpx.Response, node: Node) -> dict[str, Any]:
    """A node's answer about a sandbox, checked to be one (not a 500 for whatever else)."""
    try:
        info = seen.json()
    except ValueError:
        info = None
    if not isinstance(info, dict) or not isinstance(info.get("runtime"), str):
        raise ServiceUnavailable(
            f"node {node.name} did not describe the sandbox; retry shortly",
            code="node_unavailable",
        )
    return info


async def _each_once(request: Request) -> Response:
    """The caller's snapshots or built images from every node, each once."""
    return await moves.list_all(_front(request), request)


async def _snapshot(request: Request) -> Response:
    """One of the caller's snapshots, from the node that has it; deleted on every node."""
    front, ref = _front(request), request.path_params["ref"]
    if request.method == "DELETE":
        return await moves.delete_everywhere(front, request, ref)
    found = await moves.find(front, moves.snapshot_path(ref), moves.asked(request))
    if found is None:
        return await forward(front, front.any_nodes(), request)  # it says there is none
    return JSONResponse(found[1])


async def _image(request: Request) -> Response:
    """One of the caller's built images, from a node that has it whole."""
    front, ref = _front(request), request.path_params["ref"]
    if ref == "usage":  # the node's disk use, not an image
        return await _anything(request)
    found = await moves.find(front, f"/v1/images/{quote(ref, safe='')}", moves.asked(request))
    if found is None:
        return await forward(front, front.any_nodes(), request)  # it says there is none
    return JSONResponse(found[1])


async def _nodes(request: Request) -> Response:
    front = _front(request)
    refused = await _unless_admin(front, request)
    if refused is not None:
        return refused
    return JSONResponse(await _listed(front))


async def _drain(request: Request) -> Response:
    """POST: place no new sandboxes on the node; DELETE: place there again (admin keys)."""
    front = _front(request)
    refused = await _unless_admin(front, request)
    if refused is not None:
        return refused
    try:
        node = placement.named(front.nodes, request.path_params["name"])
        await front.drain(node, request.method == "POST")
    except CorralError as error:
        return error_response(error)
    return JSONResponse(next(e for e in await _listed(front) if e["name"] == node.name))


async def _unless_admin(front: Front, request: Request) -> Response | None:
    """None if the caller's key is an admin's; else the answer that says why not (the first
    node that answers asks the store)."""
    sent = headers(request.headers.raw)
    for node in front.any_nodes():
        try:
            probe = await front.http.get(f"{node.url}/v1/nodes", headers=sent, timeout=30)
        except httpx.HTTPError:
            continue  # down, and not yet reported lost: the next
        return None if probe.status_code == 200 else moves.relayed(probe)
    return await forward(front, [], request)  # no node answers


async def _listed(front: Front) -> list[dict[str, Any]]:
    nodes = list(front.nodes.values())  # once: a node may join while they are asked
    described = await asyncio.gather(*(front.describe(node) for node in nodes))
    return [placement.node_entry(n, seen) for n, seen in zip(nodes, described, strict=True)]


async def _events(request: Request) -> Response:
    """Every node's events for the caller (or only its node's, with `sandbox_id`), merged."""
    front, sandbox_id = _front(request), request.query_params.get("sandbox_id")
    try:
        nodes = (await front.route(sandbox_id, fresh=True))[0] if sandbox_id else front.ready()
    except CorralError as error:
        return error_response(error)
    return await merged_events(
        front.http, [node.url for node in nodes], request, headers(request.headers.raw),
        store=front.store, hub=front.events,
    )  # fmt: skip


async def _metrics(request: Request) -> Response:
    """Every ready node's Prometheus metrics, each sample labelled with its `node`."""
    front = _front(request)
    answers = await gather.ask_all(
        front.http, front.urls(), "/metrics", headers(request.headers.raw)
    )
    if isinstance(answers, Response):
        return answers
    texts = {name: answer.text for name, answer in answers.items()}
    return Response(gather.labelled(texts), media_type=PROMETHEUS)


async def _latest_metrics(request: Request) -> Response:
    """The caller's sandboxes' newest usage samples, from every ready node."""
    front = _front(request)
    answers = await gather.ask_all(
        front.http, front.urls(), request.url.path, headers(request.headers.raw)
    )
    return answers if isinstance(answers, Response) else gather.joined(answers)


async def _anything(request: Request) -> Response:
    front = _front(request)
    sandbox = sandbox_of(request.url.path, request.headers.raw)
    try:
        nodes, elsewhere = await front.route(sandbox)
    except CorralError as error:
        return error_response(error)
    # A preview's body is its server's to take as it comes (`Expect`, a slow sender).
    preview = previewed(request.url.path, request.headers.raw) is not None
    body = None if preview else await small_body(request)
    return await forward(front, nodes, request, body, sandbox=sandbox, from_store=elsewhere)


async def _socket(websocket: WebSocket) -> None:
    front = _front(websocket)
    sandbox = sandbox_of(websocket.url.path, websocket.headers.raw)
    try:
        # Asked of the store, not this front's memory: a socket refused by a node cannot be
        # sent on to another.
        nodes = (await front.route(sandbox, fresh=True))[0]
    except CorralError:
        nodes = []
    if not nodes:
        await websocket.close(code=1013)
        return
    await relay(nodes[0].url, front.trust, websocket.scope, websocket.receive, websocket.send)
