"""Where the front sends a request about a sandbox: its memory of where each one runs is a
hint, bounded, and corrected when a node refuses the sandbox, naming the node that runs it (it
moved through another front); and the node's side of that refusal."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from corral.core.errors import CorralError
from corral.core.state import SandboxState
from corral.server.cluster import api
from corral.server.cluster.elsewhere import Elsewhere
from corral.server.cluster.front import Front
from corral.server.cluster.locations import Locations
from corral.server.cluster.placement import Node
from corral.server.cluster.proxy import FROM_STORE, forward, previewed, small_body
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


Seen = list[tuple[str, str, bytes, str | None, str | None]]


def _nodes(front: Front, seen: Seen) -> None:
    """n0 refuses the sandbox, saying it runs on another node (as `Elsewhere` does, unless told
    to answer from the store; the store says n1); the other nodes echo what they were sent."""

    async def answer(request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        host = request.url.host.split(".")[0]
        marked = request.headers.get(FROM_STORE)
        seen.append((host, request.method, body, request.headers.get("content-length"), marked))
        if host == "n0" and marked is None:
            return _streamed(421, {"error": {"code": "sandbox_on_another_node"}})
        return _streamed(200, {"node": host, "body": body.decode()})

    front.http = httpx.AsyncClient(transport=httpx.MockTransport(answer))


def _streamed(status: int, answer: dict[str, Any]) -> httpx.Response:
    """An answer as a node's comes: streamed (a mock's `json=` answer is read already)."""
    return httpx.Response(status, stream=httpx.ByteStream(json.dumps(answer).encode()))


def _request(
    method: str, path: str, body: bytes, *, chunked: bool = False, marked: bool = False
) -> Request:
    sent = [(b"transfer-encoding", b"chunked")] if chunked else []
    if body and not chunked:
        sent = [(b"content-length", str(len(body)).encode())]
    if marked:
        sent.append((FROM_STORE.encode(), b"1"))
    messages: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> Message:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    scope = {"type": "http", "method": method, "path": path, "query_string": b"", "headers": sent}
    return Request(scope, receive)


async def _sent(front: Front, request: Request) -> httpx.Response:
    nodes, elsewhere = await front.route(SANDBOX)
    body = await small_body(request)
    answer = await forward(front, nodes, request, body, sandbox=SANDBOX, from_store=elsewhere)
    if isinstance(answer, StreamingResponse):
        body = b"".join([chunk async for chunk in answer.body_iterator])  # type: ignore[misc]
        if answer.background is not None:
            await answer.background()
    else:
        body = answer.body
    return httpx.Response(answer.status_code, content=body)


@pytest.mark.parametrize(
    ("method", "body"), [("POST", b'{"cmd": "echo moved"}'), ("GET", b""), ("DELETE", b"")]
)
async def test_a_request_its_old_node_refuses_goes_to_the_node_named(
    front: Front, method: str, body: bytes
) -> None:
    """Another front moved the sandbox from n0 to n1: n0 refuses (421, naming n1) before it
    reads anything; the request goes to n1, whole, and n1 is remembered."""
    seen: Seen = []
    _nodes(front, seen)
    front.located[SANDBOX] = "n0"
    path = f"/v1/sandboxes/{SANDBOX}/run"
    answer = await _sent(front, _request(method, path, body))
    assert answer.status_code == 200 and answer.json() == {"node": "n1", "body": body.decode()}
    assert [(host, sent) for host, _, sent, _, _ in seen] == [("n0", body), ("n1", body)]
    assert front.located.get(SANDBOX) == "n1"
    seen.clear()
    assert (await _sent(front, _request(method, path, body))).status_code == 200
    assert [host for host, *_ in seen] == ["n1"]  # straight there from now on


async def test_a_streamed_upload_is_not_sent_twice_but_the_next_one_goes_to_the_right_node(
    front: Front,
) -> None:
    seen: Seen = []
    _nodes(front, seen)
    front.located[SANDBOX] = "n0"
    path = f"/v1/sandboxes/{SANDBOX}/files"
    first = await _sent(front, _request("PUT", path, b"x" * 10, chunked=True))
    assert first.status_code == 503 and first.json()["error"]["code"] == "sandbox_moved"
    assert [host for host, *_ in seen] == ["n0"]
    assert (await _sent(front, _request("PUT", path, b"x" * 10, chunked=True))).status_code == 200
    assert [host for host, *_ in seen] == ["n0", "n1"]


async def test_a_sandbox_whose_node_is_not_ready_is_answered_from_the_store(
    front: Front,
) -> None:
    """Sent on purpose to another node (the sandbox's is lost), a request says so; a client's
    own `X-Corral-From-Store` is never sent on; a refusal naming a node that is not ready is
    a 503 to retry."""
    seen: Seen = []
    _nodes(front, seen)
    front.nodes["n1"].state = "lost"
    front.nodes["n2"] = Node("n2", 2, "http://n2.test", "ready")
    path = f"/v1/sandboxes/{SANDBOX}"
    for _ in range(3):  # whichever ready node it goes to
        assert (await _sent(front, _request("GET", path, b""))).status_code == 200
    assert {marked for *_, marked in seen} == {"1"}
    seen.clear()
    front.located[SANDBOX] = "n0"
    answer = await _sent(front, _request("GET", path, b"", marked=True))
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "node_unavailable"
    assert [(host, marked) for host, *_, marked in seen] == [("n0", None)]


async def test_a_remembered_node_that_is_gone_is_asked_of_the_store_again(front: Front) -> None:
    """The sandbox moved (to n1) while this front remembered n2, which has gone since: the
    store's word, not any node's answer from the store."""
    seen: Seen = []
    _nodes(front, seen)
    front.nodes["n2"] = Node("n2", 2, "http://n2.test", "lost")
    front.located[SANDBOX] = "n2"
    answer = await _sent(front, _request("DELETE", f"/v1/sandboxes/{SANDBOX}", b""))
    assert answer.status_code == 200 and answer.json()["node"] == "n1"
    assert [(host, marked) for host, *_, marked in seen] == [("n1", None)]
    assert front.located.get(SANDBOX) == "n1"


async def test_a_421_from_the_node_the_store_names_is_the_callers(front: Front) -> None:
    """A preview's own server may answer 421 too: where the store still names the node that
    answered, the answer goes back as it is, and the request to no other node."""
    seen: Seen = []

    async def answer(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.host, request.method, b"", None, None))
        return _streamed(421, {"said": "by the app"})

    front.http = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    front.located[SANDBOX] = "n1"
    answer_ = await _sent(front, _request("GET", f"/preview/{SANDBOX}/8080/", b""))
    assert answer_.status_code == 421 and answer_.json() == {"said": "by the app"}
    assert [host for host, *_ in seen] == ["n1.test"]


async def test_any_other_answer_of_the_node_is_the_callers(front: Front) -> None:
    """A 404 (a missing file, an ended sandbox) is not a sign of a move: no store read, no
    second node."""
    seen: Seen = []

    async def answer(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.host, request.method, b"", None, None))
        return _streamed(404, {"error": {"code": "file_not_found"}})

    front.http = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    front.located[SANDBOX] = "n0"
    answer_ = await _sent(front, _request("GET", f"/v1/sandboxes/{SANDBOX}/files", b""))
    assert answer_.status_code == 404 and answer_.json()["error"]["code"] == "file_not_found"
    assert [host for host, *_ in seen] == ["n0.test"]


async def test_a_body_the_front_rewrote_is_sent_with_its_own_length(front: Front) -> None:
    """A fork onto the sandbox's own node goes on without its `node` field: the body is
    shorter than the client's Content-Length said."""
    seen: Seen = []
    _nodes(front, seen)
    client_sent = json.dumps({"count": 1, "node": "n1"}).encode()
    rewritten = json.dumps({"count": 1}).encode()
    request = _request("POST", f"/v1/sandboxes/{SANDBOX}/fork", client_sent)
    answer = await forward(front, [front.nodes["n1"]], request, rewritten)
    assert answer.status_code == 200
    assert seen == [("n1", "POST", rewritten, str(len(rewritten)), None)]


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


class _Engine:
    """What `Elsewhere` asks of the node's engine: which node it is, whether it holds one (and
    hands it off: `leaving`)."""

    node = "n0"

    def __init__(self) -> None:
        self.held: dict[str, str | None] = {}  # sandbox id -> the node it is leaving for
        self.registry = self

    def find(self, sandbox_id: str) -> SimpleNamespace | None:
        held = sandbox_id in self.held
        return SimpleNamespace(leaving=self.held[sandbox_id]) if held else None


async def test_a_node_refuses_a_live_sandbox_the_store_places_on_another_node(
    front: Front,
) -> None:
    """Before any route or gateway: the API, E2B's routes and previews alike; not when the
    front asks for the store's answer, nor for one it holds, nor for one that ended."""
    reached: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"answered"})

    engine = _Engine()
    service = SimpleNamespace(engine=engine, store=front.store)
    guarded = Elsewhere(app, service)  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=guarded)
    async with httpx.AsyncClient(transport=transport, base_url="http://node") as node:
        for path, extra in (
            (f"/v1/sandboxes/{SANDBOX}/run", {}),
            (f"/sandboxes/{SANDBOX}", {}),  # E2B's control API
            ("/files", {"E2b-Sandbox-Id": SANDBOX}),  # E2B's calls to its daemon
            ("/", {"Host": f"8000-{SANDBOX}.preview.example"}),
        ):
            refused = await node.post(path, headers=extra, content=b"never read")
            assert refused.status_code == 421, path
            assert refused.json()["error"]["code"] == "sandbox_on_another_node"
            # Not where: whoever reaches a node (this one sent no key) learns nothing of it.
            assert "n1" not in refused.text and "x-corral-node" not in refused.headers
        assert reached == []
        asked = await node.get(f"/v1/sandboxes/{SANDBOX}", headers={FROM_STORE: "1"})
        assert asked.status_code == 200
        assert (await node.post(f"/v1/sandboxes/{SANDBOX}/take-in")).status_code == 200  # a move's
        preview = f"/preview/{SANDBOX}/8080/v1/sandboxes/{SANDBOX}/take-in"
        assert (await node.post(preview)).status_code == 421  # not a move's step
        engine.held[SANDBOX] = None
        assert (await node.get(f"/v1/sandboxes/{SANDBOX}")).status_code == 200
        engine.held[SANDBOX] = "n1"  # handed off, and taken in there: the store says n1
        assert (await node.get(f"/v1/sandboxes/{SANDBOX}")).status_code == 421
        assert (await node.post(f"/v1/sandboxes/{SANDBOX}/hand-off/done")).status_code == 200
        engine.held.clear()
        found = await front.store.get_sandbox(SANDBOX)
        assert found is not None
        ended = dataclasses.replace(found[1], state=SandboxState.TERMINATED)
        await front.store.update_sandbox(ended)
        assert (await node.get(f"/v1/sandboxes/{SANDBOX}")).status_code == 200
        assert (await node.get("/v1/sandboxes")).status_code == 200  # about no one sandbox
    assert len(reached) == 6
