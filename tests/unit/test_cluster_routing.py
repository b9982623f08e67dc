"""Where the front sends a request about a sandbox: its memory of where each one runs is a
hint, bounded, and corrected from the store when a node no longer has the sandbox (it moved
through another front)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.types import Message

from corral.core.errors import CorralError
from corral.core.state import SandboxState
from corral.server.cluster import api
from corral.server.cluster.front import Front
from corral.server.cluster.locations import Locations
from corral.server.cluster.placement import Node
from corral.server.cluster.proxy import forward, previewed, small_body
from corral.server.config import ServerConfig
from tests.unit.test_cluster_moves import SANDBOX, store_with_sandbox


def test_the_fronts_memory_of_locations_forgets_the_least_recently_used_past_its_limit() -> None:
    located = Locations(limit=3)
    for index in range(3):
        located[f"sb-{index}"] = "n0"
    assert located.get("sb-0") == "n0"  # used: now the most recent
    located["sb-3"] = "n1"
    assert len(located) == 3
    assert located.get("sb-1") is None  # the least recently used went
    assert [located.get(f"sb-{i}") for i in (0, 2, 3)] == ["n0", "n0", "n1"]
    located.forget("sb-2")
    assert located.get("sb-2") is None and len(located) == 2


async def _evacuate(_front: Front, _node: Any) -> None:
    raise AssertionError("nothing drains here")


@pytest.fixture
async def front(tmp_path: Path) -> AsyncIterator[Front]:
    """A front of two ready nodes, with a store that says the sandbox runs on n1."""
    made = Front(ServerConfig(data_dir=tmp_path), 0, _evacuate)
    made.nodes = {
        name: Node(name, index, f"http://{name}.test", "ready")
        for index, name in enumerate(("n0", "n1"))
    }
    made._store = await store_with_sandbox(tmp_path / "corral.db", SandboxState.RUNNING, "n1")
    yield made
    await made.http.aclose()
    await made.store.close()


def _nodes(front: Front, seen: list[tuple[str, str, bytes, str | None]]) -> None:
    """n0 no longer has the sandbox (404); n1 runs it and echoes what it was sent."""

    async def answer(request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        host = request.url.host.split(".")[0]
        seen.append((host, request.method, body, request.headers.get("content-length")))
        if host == "n0":
            return _streamed(404, {"error": {"code": "sandbox_not_found"}})
        return _streamed(200, {"node": host, "body": body.decode()})

    front.http = httpx.AsyncClient(transport=httpx.MockTransport(answer))


def _streamed(status: int, answer: dict[str, Any]) -> httpx.Response:
    """An answer as a node's comes: streamed (a mock's `json=` answer is read already)."""
    return httpx.Response(status, stream=httpx.ByteStream(json.dumps(answer).encode()))


def _request(method: str, path: str, body: bytes, *, chunked: bool = False) -> Request:
    sent = [(b"transfer-encoding", b"chunked")] if chunked else []
    if body and not chunked:
        sent = [(b"content-length", str(len(body)).encode())]
    messages: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> Message:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    scope = {"type": "http", "method": method, "path": path, "query_string": b"", "headers": sent}
    return Request(scope, receive)


async def _sent(front: Front, request: Request) -> httpx.Response:
    nodes = await front.nodes_for(SANDBOX)
    answer = await forward(front, nodes, request, await small_body(request), sandbox=SANDBOX)
    body = b"".join([chunk async for chunk in answer.body_iterator])  # type: ignore[attr-defined]
    if answer.background is not None:
        await answer.background()
    return httpx.Response(answer.status_code, content=body)


@pytest.mark.parametrize(
    ("method", "body"), [("POST", b'{"cmd": "echo moved"}'), ("GET", b""), ("DELETE", b"")]
)
async def test_a_request_its_remembered_node_answers_404_goes_where_the_store_says(
    front: Front, method: str, body: bytes
) -> None:
    """Another front moved the sandbox from n0 to n1: the first answer (404) is not the
    caller's; the request goes to n1, whole, and n1 is remembered."""
    seen: list[tuple[str, str, bytes, str | None]] = []
    _nodes(front, seen)
    front.located[SANDBOX] = "n0"
    path = f"/v1/sandboxes/{SANDBOX}/run"
    answer = await _sent(front, _request(method, path, body))
    assert answer.status_code == 200 and answer.json() == {"node": "n1", "body": body.decode()}
    assert [(host, sent) for host, _, sent, _ in seen] == [("n0", body), ("n1", body)]
    assert front.located.get(SANDBOX) == "n1"
    seen.clear()
    assert (await _sent(front, _request(method, path, body))).status_code == 200
    assert [host for host, *_ in seen] == ["n1"]  # straight there from now on


async def test_a_streamed_upload_is_not_sent_twice_but_the_next_one_goes_to_the_right_node(
    front: Front,
) -> None:
    seen: list[tuple[str, str, bytes, str | None]] = []
    _nodes(front, seen)
    front.located[SANDBOX] = "n0"
    path = f"/v1/sandboxes/{SANDBOX}/files"
    first = await _sent(front, _request("PUT", path, b"x" * 10, chunked=True))
    assert first.status_code == 404 and [host for host, *_ in seen] == ["n0"]
    assert (await _sent(front, _request("PUT", path, b"x" * 10, chunked=True))).status_code == 200
    assert [host for host, *_ in seen] == ["n0", "n1"]


async def test_a_404_from_the_node_the_store_names_is_the_callers(front: Front) -> None:
    """The store agrees with the node that answered: nothing is sent again."""
    seen: list[tuple[str, str, bytes, str | None]] = []
    _nodes(front, seen)
    found = await front.store.get_sandbox(SANDBOX)
    assert found is not None
    await front.store.update_sandbox(dataclasses.replace(found[1], node="n0"))
    answer = await _sent(front, _request("GET", f"/v1/sandboxes/{SANDBOX}/files", b""))
    assert answer.status_code == 404 and [host for host, *_ in seen] == ["n0"]
    assert answer.json()["error"]["code"] == "sandbox_not_found"


async def test_a_body_the_front_rewrote_is_sent_with_its_own_length(front: Front) -> None:
    """A fork onto the sandbox's own node goes on without its `node` field: the body is
    shorter than the client's Content-Length said."""
    seen: list[tuple[str, str, bytes, str | None]] = []
    _nodes(front, seen)
    client_sent = json.dumps({"count": 1, "node": "n1"}).encode()
    rewritten = json.dumps({"count": 1}).encode()
    request = _request("POST", f"/v1/sandboxes/{SANDBOX}/fork", client_sent)
    answer = await forward(front, [front.nodes["n1"]], request, rewritten)
    assert answer.status_code == 200
    assert seen == [("n1", "POST", rewritten, str(len(rewritten)))]


def test_previews_are_told_from_api_requests() -> None:
    assert previewed(f"/preview/{SANDBOX}/8080/") == SANDBOX
    assert previewed("/", [(b"host", f"8080-{SANDBOX}.preview.example".encode())]) == SANDBOX
    assert previewed(f"/v1/sandboxes/{SANDBOX}/run") is None


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(200, text="<html>a proxy's page</html>"),
        httpx.Response(200, json=["not", "a", "sandbox"]),
        httpx.Response(200, json={"id": SANDBOX}),
    ],
)
def test_a_node_answer_that_is_not_a_sandbox_fails_a_move_clearly(answer: httpx.Response) -> None:
    with pytest.raises(CorralError) as refused:
        api._sandbox_seen(answer, Node("n0", 0, "http://n0.test", "ready"))
    assert (refused.value.status_code, refused.value.code) == (503, "node_unavailable")
