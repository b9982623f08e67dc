"""Snapshots across the nodes of a cluster.

A snapshot lives on the node that took it. The front finds it wherever it is, lists each once
and deletes every copy; when a sandbox is to start from it on another node (a create placed
there, or a fork onto another node), the front copies it there first: the holder packs it as an
archive and names its SHA-256, the archive streams through the front to the other node, which
checks the digest before it installs anything (`corral.engine.snapshots`). The copy stays, so
the next start there needs none. The built image its sandboxes start from goes along the same
way if that node lacks it (`corral.images.transfer`).
"""

from __future__ import annotations

import contextlib
import json
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from corral.core.errors import InvalidRequest, ServiceUnavailable
from corral.core.spec import FIXED_AT_START
from corral.engine.checkpoints import MAX_FORK
from corral.server.cluster import images
from corral.server.cluster.archives import copy_archive
from corral.server.cluster.placement import Node
from corral.server.cluster.proxy import headers
from corral.server.errors import error_response

if TYPE_CHECKING:
    from corral.server.cluster.front import Front

FORK_TTL = 3600.0  # of the snapshot a fork across nodes is made from (deleted after)
Headers = list[tuple[bytes, bytes]]


def snapshot_path(ref: str) -> str:
    return f"/v1/snapshots/{quote(ref, safe='')}"


def asked(request: Request) -> Headers:
    """The caller's headers, to send on with a body of the front's own."""
    return [(k, v) for k, v in headers(request.headers.raw) if k.lower() != b"content-length"]


async def find(front: Front, path: str, sent: Headers) -> tuple[Node, dict[str, Any]] | None:
    """The first ready node that has what `path` names (the caller's snapshot or built image,
    by id or name), and its entry."""
    for node in front.ready():
        try:
            answer = await front.http.get(f"{node.url}{path}", headers=sent, timeout=30)
        except httpx.HTTPError:
            continue
        if answer.status_code == 200:
            return node, answer.json()
    return None


async def copy(front: Front, snapshot_id: str, source: Node, target: Node) -> None:
    """Copy snapshot `snapshot_id` from `source` to `target` (nothing if it is there), and
    the built image its sandboxes start from, if `target` lacks it."""
    image = await copy_archive(
        front, f"/v1/snapshots/{snapshot_id}/archive", source, target,
        what=f"snapshot {snapshot_id}", code="snapshot_copy_failed",
    )  # fmt: skip
    await images.copy(front, image, source, target)


async def holder_first(
    front: Front, request: Request, body: bytes, nodes: list[Node]
) -> tuple[str, Node] | None:
    """For a create from a snapshot: its id and the node that holds it, which goes first
    among `nodes` if it is there (a start there needs no copy). None if the body names no
    snapshot, or none of the caller's (a node then says so)."""
    spec = json.loads(body)
    ref = spec.get("snapshot")
    if not isinstance(ref, str) or not ref:
        return None
    found = await find(front, snapshot_path(ref), asked(request))
    if found is None:
        return None
    holder, entry = found
    if holder in nodes:
        nodes.remove(holder)
        nodes.insert(0, holder)
    return str(entry["id"]), holder


async def list_all(front: Front, request: Request) -> Response:
    """The caller's snapshots (or built images) on every node, each once (a copy is on
    several nodes, and each node lists only those it has)."""
    seen: dict[str, dict[str, Any]] = {}
    for node in front.ready():
        try:
            answer = await front.http.get(f"{node.url}{request.url.path}", headers=asked(request))
        except httpx.HTTPError:
            continue
        if answer.status_code != 200:
            return relayed(answer)
        for entry in answer.json():
            seen.setdefault(entry["id"], entry)
    return JSONResponse(sorted(seen.values(), key=lambda entry: entry["created_at"]))


async def delete_everywhere(front: Front, request: Request, ref: str) -> Response:
    """Delete the caller's snapshot `ref` on every node that has a copy."""
    answers = []
    for node in front.ready():
        try:
            answers.append(
                await front.http.delete(
                    f"{node.url}/v1/snapshots/{quote(ref, safe='')}", headers=asked(request)
                )
            )
        except httpx.HTTPError:
            continue
    done = [answer for answer in answers if answer.status_code == 204]
    if done or not answers:
        return Response(status_code=204) if done else _no_node()
    return relayed(answers[0])


async def fork_across(
    front: Front, request: Request, sandbox_id: str, *, source: Node, target: Node, count: object
) -> Response:
    """`count` copies of sandbox `sandbox_id` (on `source`) started on `target`: a snapshot
    taken for the purpose, copied, started from `count` times, and deleted everywhere. All
    or nothing, as a fork on one node."""
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_FORK:
        raise InvalidRequest(f"count must be 1 to {MAX_FORK}")
    sent = asked(request)
    try:
        return await _fork_across(
            front, sent, sandbox_id, source=source, target=target, count=count
        )
    except httpx.HTTPError as exc:
        raise ServiceUnavailable(
            f"node {source.name} or {target.name} did not answer during the fork "
            f"({type(exc).__name__}); copies may remain: list your sandboxes before you retry",
            code="node_unavailable",
        ) from exc


async def _fork_across(
    front: Front, sent: Headers, sandbox_id: str, *, source: Node, target: Node, count: int
) -> Response:
    info = await front.http.get(f"{source.url}/v1/sandboxes/{sandbox_id}", headers=sent)
    if info.status_code != 200:
        return relayed(info)
    taken = await front.http.post(
        f"{source.url}/v1/sandboxes/{sandbox_id}/snapshot", headers=sent, json={"ttl": FORK_TTL}
    )
    if taken.status_code != 201:
        return relayed(taken)
    snapshot_id = taken.json()["id"]
    fixed = {*FIXED_AT_START, "volumes", "env"}  # the snapshot's own
    spec = {k: v for k, v in info.json()["spec"].items() if k not in fixed}
    made: list[dict[str, Any]] = []
    whole = False
    try:
        await copy(front, snapshot_id, source, target)
        for _ in range(count):
            answer = await front.http.post(
                f"{target.url}/v1/sandboxes", headers=sent, json={**spec, "snapshot": snapshot_id}
            )
            if answer.status_code != 201:
                return relayed(answer)
            made.append(answer.json())
            front.located[made[-1]["id"]] = target.name
        whole = True
    finally:
        for entry in [] if whole else made:  # all or nothing
            with contextlib.suppress(httpx.HTTPError):
                await front.http.delete(f"{target.url}/v1/sandboxes/{entry['id']}", headers=sent)
        for node in (source, target):
            with contextlib.suppress(httpx.HTTPError):
                await front.http.delete(f"{node.url}/v1/snapshots/{snapshot_id}", headers=sent)
    return JSONResponse(made, status_code=201)


def relayed(answer: httpx.Response) -> Response:
    kept = {"content-type", "retry-after"}
    return Response(
        answer.content,
        status_code=answer.status_code,
        headers={k: v for k, v in answer.headers.items() if k.lower() in kept},
    )


def _no_node() -> Response:
    return error_response(
        ServiceUnavailable("no node of the cluster answered; retry", code="no_node_ready")
    )
