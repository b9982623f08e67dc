"""Requests sent on from the front to a node: as they are, streamed both ways; to the next
node only where the first cannot have acted on them."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from corral.core.errors import LimitReached, ServiceUnavailable
from corral.server.cluster.placement import Node
from corral.server.errors import error_response

if TYPE_CHECKING:
    from corral.server.cluster.front import Front

PREVIEW_HOST = re.compile(r"^\d{1,5}-(sb-[0-9a-z]{16})\.")
# Not copied between the client's connection and the node's.
# The client's Host goes on: a node serves previews by host name. `Expect: 100-continue` is the
# front's to answer (it does as it reads the body); the front's own client sends at once.
SMALL_BODY = 64 * 1024  # bytes; a request with a larger body is streamed to its node
FROM_STORE = "x-corral-from-store"  # the front's: answer from the store, wherever it runs
# A client's `X-Corral-From-Store` is not sent on: only the front says so.
HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "upgrade", "te", "expect", FROM_STORE}
)


def headers(raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(name, value) for name, value in raw if name.decode("latin-1").lower() not in HOP]


async def forward(
    front: Front,
    nodes: list[Node],
    request: Request,
    body: bytes | None = None,
    *,
    sandbox: str | None = None,
    from_store: bool = False,
) -> Response:
    """`request` sent on to the first of `nodes` that takes the connection (one that refuses
    it has read nothing of the request; a read goes on to the next whatever happened), and
    its answer streamed back.

    A request about `sandbox` that its node refuses, saying it runs on another node (421,
    `corral.server.cluster.elsewhere`: it moved through another front), goes to the node the
    store names now, where it can be sent again (read whole, or without a body): the first
    read nothing of it. (The node's 421 names no node: it says so to whoever reaches it.) One
    sent `from_store` (`nodes` are not the sandbox's: `Front.route`) says so, and is answered
    from the store."""
    if not nodes:
        return error_response(
            ServiceUnavailable("no node of the cluster is ready; retry", code="no_node_ready")
        )
    path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    content: Any = body if body is not None else request.stream()
    sent_headers = headers(request.headers.raw)
    if body is not None:  # its length is the body's, which may not be the one the client sent
        sent_headers = [(k, v) for k, v in sent_headers if k.lower() != b"content-length"]
    if from_store:
        sent_headers.append((FROM_STORE.encode(), b"1"))
    for node in nodes:
        sent = front.http.build_request(
            request.method, node.url + path, headers=sent_headers, content=content
        )
        try:
            answer = await front.http.send(sent, stream=True)
            break
        except httpx.ConnectError:
            continue  # down, and not yet reported lost: the next
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            if request.method in ("GET", "HEAD"):  # it died under us; a read may go again
                continue
            return unavailable(node, exc)
        except httpx.HTTPError as exc:
            return unavailable(node, exc)
    else:
        return unavailable(node, None)
    if sandbox is not None and answer.status_code == 421:
        # Also a preview's own answer could be a 421: sent on only where the store names
        # another node than the one that answered.
        moved_to = await front.located.lookup(front.store, sandbox, fresh=True)
        if moved_to is not None and moved_to != node.name:
            await answer.aclose()
            return await _sent_on(front, request, body, sandbox, moved_to)
    return StreamingResponse(
        answer.aiter_raw(),
        status_code=answer.status_code,
        headers={k: v for k, v in answer.headers.items() if k.lower() not in HOP},
        background=BackgroundTask(answer.aclose),
    )


async def _sent_on(
    front: Front, request: Request, body: bytes | None, sandbox: str, name: str
) -> Response:
    """`request`, refused by a node because `sandbox` runs on node `name`, sent there."""
    front.located[sandbox] = name
    node = front.nodes.get(name)
    if node is None or node.state != "ready":
        return error_response(
            ServiceUnavailable(
                f"sandbox {sandbox}'s node {name} is not ready; retry shortly",
                code="node_unavailable",
            )
        )
    if body is None and _has_body(request):  # partly sent already: the caller sends it again
        return error_response(
            ServiceUnavailable(
                f"sandbox {sandbox} moved to node {name} meanwhile; retry", code="sandbox_moved"
            )
        )
    return await forward(front, [node], request, body or b"")


def _has_body(request: Request) -> bool:
    sent = request.headers
    return sent.get("content-length", "0") != "0" or "transfer-encoding" in sent


async def small_body(request: Request) -> bytes | None:
    """The body of `request` read whole if it is small (a command, a JSON object: so that it
    can be sent again), else None (an upload: streamed through)."""
    sent = request.headers
    length = sent.get("content-length", "")
    if "transfer-encoding" in sent or not length.isdigit() or int(length) > SMALL_BODY:
        return None
    return await request.body()


def unavailable(node: Node, exc: Exception | None) -> Response:
    why = f" ({type(exc).__name__})" if exc is not None else ""
    return error_response(
        ServiceUnavailable(f"node {node.name} did not answer{why}; retry", code="node_unavailable")
    )


def sandbox_of(path: str, sent: Sequence[tuple[bytes, bytes]] = ()) -> str | None:
    """The sandbox a request is about: named in its path; in its host name, for a preview
    by host name (`{port}-{sandbox}.{domain}`); or, for E2B's SDKs talking to a sandbox's own
    daemon (envd, the code interpreter), in its `E2b-Sandbox-Id` header."""
    given = dict(sent)
    named = given.get(b"e2b-sandbox-id", b"").decode("latin-1").strip()
    if named.startswith("sb-"):
        return named
    return previewed(path, sent) or _in_path(path.strip("/").split("/"))


def previewed(path: str, sent: Sequence[tuple[bytes, bytes]] = ()) -> str | None:
    """The sandbox whose preview a request is for (by host name, or under /preview/): its
    body and answer are a tenant's server's."""
    label = PREVIEW_HOST.match(dict(sent).get(b"host", b"").decode("latin-1").lower())
    if label is not None:
        return label[1]
    parts = path.strip("/").split("/")
    return parts[1] if len(parts) >= 2 and parts[0] == "preview" else None


def _in_path(parts: list[str]) -> str | None:
    if parts[:1] == ["v2"]:  # E2B's control API, /v2/sandboxes/{id}…, as /sandboxes/{id}…
        parts = parts[1:]
    for start in (["v1", "sandboxes"], ["sandboxes"]):
        rest = parts[len(start) :]
        if parts[: len(start)] == start and rest and rest[0].startswith("sb-"):
            return rest[0]
    return None


async def create_on(front: Front, node: Node, request: Request, body: bytes) -> Response:
    """Create on `node`; the answer is read whole (it is small) to learn the new id's node."""
    target = node.url + request.url.path + (f"?{request.url.query}" if request.url.query else "")
    sent = [(k, v) for k, v in headers(request.headers.raw) if k.lower() != b"content-length"]
    try:
        answer = await front.http.request("POST", target, headers=sent, content=body)
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # it got nothing: the next node
        return error_response(
            LimitReached(
                f"node {node.name} did not answer ({type(exc).__name__}); retry",
                code="node_unavailable",
            )
        )
    except httpx.HTTPError as exc:
        # Sent, and perhaps made: another node must not make a second one. If the node is
        # lost, what it made ends `node_lost`.
        return error_response(
            ServiceUnavailable(
                f"node {node.name} failed during the create ({type(exc).__name__}); list your "
                "sandboxes before you retry: it may have made one",
                code="node_unavailable",
            )
        )
    with contextlib.suppress(ValueError, KeyError, TypeError):
        made = answer.json()  # Corral's sandbox, or E2B's (`sandboxID`)
        front.located[made.get("id") or made["sandboxID"]] = made.get("node") or node.name
    kept = HOP | {"content-length", "content-encoding"}  # the body is read, decoded
    return Response(
        answer.content,
        status_code=answer.status_code,
        headers={k: v for k, v in answer.headers.items() if k.lower() not in kept},
    )
