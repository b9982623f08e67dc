"""The front's side of a move (`corral.server.cluster.migration.move`) when an answer is lost:
the nodes are stand-ins (httpx's mock transport) that answer as the node servers do, the
store is real SQLite. A take-in whose answer never came back but that happened (the store
says so) is a move done, and the old node forgets the sandbox; one that did not happen leaves
the sandbox where it was. Either way it never stays on two nodes."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from corral.core.errors import CorralError
from corral.core.models import SandboxInfo, StateChange
from corral.core.spec import SandboxSpec
from corral.core.state import SandboxState
from corral.engine.sealing import KeyRing
from corral.server.cluster.migration import move
from corral.server.cluster.placement import Node
from corral.server.store import Store

SANDBOX = "sb-00000000000000aa"
SOURCE = Node("n0", 0, "http://n0.test", state="ready")
TARGET = Node("n1", 1, "http://n1.test", state="ready")


@dataclass
class StandIn:
    """What a front is to `move`: its HTTP client to the nodes, its key, the store."""

    store: Store
    http: httpx.AsyncClient
    located: dict[str, str] = field(default_factory=dict)

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": "Bearer corral_front"}


async def store_with_sandbox(path: Path, state: SandboxState, node: str) -> Store:
    """A store at `path` with one owner's gVisor sandbox `SANDBOX`, in `state`, on `node`."""
    opened = await Store.open(path, KeyRing([bytes(32)]))
    key, _ = await opened.create_key("owner")
    now = time.time()
    await opened.add_sandbox(
        key.id,
        SandboxInfo(
            id=SANDBOX, state=state, runtime="gvisor", spec=SandboxSpec(runtime="gvisor"),
            created_at=now, expires_at=None, node=node, history=(StateChange(state, now),),
        ),
    )  # fmt: skip
    return opened


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await store_with_sandbox(tmp_path / "corral.db", SandboxState.HIBERNATED, "n0")
    yield opened
    await opened.close()


def nodes(store: Store, calls: list[str], *, took_it: bool) -> httpx.MockTransport:
    """n0 hands the sandbox off; n1 takes it in (writing itself into the store) if `took_it`,
    and its answer is lost on the way either way."""

    async def answer(request: httpx.Request) -> httpx.Response:
        calls.append(f"{request.method} {request.url.host}{request.url.path}")
        path = request.url.path
        if path.endswith("/hand-off") and request.method == "POST":
            handed = {"snapshot": {"id": "sn-00000000000000bb"}, "was": "running",
                      "sandbox": {"timeout_remaining": 60.0}}  # fmt: skip
            return httpx.Response(200, json=handed)
        if path.endswith("/archive") and request.method == "GET":
            packed = httpx.ByteStream(b"tar")
            return httpx.Response(200, stream=packed, headers={"X-Corral-Digest": "sha256:0"})
        if path.endswith("/archive"):
            assert await request.aread() == b"tar"
            return httpx.Response(201, json={})
        if path.endswith("/take-in"):
            if took_it:
                found = await store.get_sandbox(SANDBOX)
                assert found is not None
                await store.update_sandbox(dataclasses.replace(found[1], node="n1"))
            raise httpx.ReadError("the answer was lost", request=request)
        return httpx.Response(204 if path.endswith("/done") else 200, json={})

    return httpx.MockTransport(answer)


async def test_a_take_in_whose_answer_was_lost_but_happened_is_a_move_done(store: Store) -> None:
    calls: list[str] = []
    async with httpx.AsyncClient(transport=nodes(store, calls, took_it=True)) as http:
        front = StandIn(store, http)
        entry = await move(front, SANDBOX, SOURCE, TARGET)  # type: ignore[arg-type]
    assert entry["id"] == SANDBOX and entry["node"] == "n1"
    assert front.located == {SANDBOX: "n1"}
    assert f"POST n0.test/v1/sandboxes/{SANDBOX}/hand-off/done" in calls  # n0 forgets it
    assert f"DELETE n0.test/v1/sandboxes/{SANDBOX}/hand-off" not in calls


async def test_a_take_in_that_did_not_happen_leaves_the_sandbox_where_it_was(
    store: Store,
) -> None:
    calls: list[str] = []
    async with httpx.AsyncClient(transport=nodes(store, calls, took_it=False)) as http:
        front = StandIn(store, http)
        with pytest.raises(CorralError) as failed:
            await move(front, SANDBOX, SOURCE, TARGET)  # type: ignore[arg-type]
    assert failed.value.status_code == 503 and failed.value.code == "node_unavailable"
    assert front.located == {}
    assert f"DELETE n0.test/v1/sandboxes/{SANDBOX}/hand-off" in calls  # n0 keeps it
    assert not any(call.endswith("/hand-off/done") for call in calls)
    found = await store.get_sandbox(SANDBOX)
    assert found is not None and found[1].node == "n0"


async def test_a_lost_nodes_end_is_not_written_over_a_move_that_came_first(store: Store) -> None:
    """The front ends a lost node's sandboxes with a write that holds only while the row is
    live on that node: a move that committed after the front read the row stays."""
    found = await store.get_sandbox(SANDBOX)
    assert found is not None
    ended = dataclasses.replace(found[1], state=SandboxState.TERMINATED, ended_at=time.time())
    await store.update_sandbox(dataclasses.replace(found[1], node="n1"))  # moved meanwhile
    assert not await store.update_sandbox(ended, live_on="n0")
    now = await store.get_sandbox(SANDBOX)
    assert now is not None and (now[1].node, now[1].state) == ("n1", SandboxState.HIBERNATED)
    there = dataclasses.replace(ended, node="n1")
    assert await store.update_sandbox(there, live_on="n1")  # where it is: it ends
    assert not await store.update_sandbox(there, live_on="n1")  # and only once
