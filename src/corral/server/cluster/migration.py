"""Sandboxes that move between a cluster's nodes, keeping their ids: one on request (its owner's
`POST /v1/sandboxes/{id}/move`), or every one that can when its node drains.

A move is a hibernation on one node and a wake on the other (`corral.engine.moving`):

1. the node it leaves hibernates it and hands off its checkpoint as a snapshot; its store row
   says `hibernated` before that node answers, and from then on it refuses every change to the
   sandbox (`sandbox_moving`);
2. the front copies the snapshot to the other node (an archive checked against its digest,
   `moves.copy`);
3. the other node takes it in under the same id, writes itself into the store row, and wakes
   it if it was running;
4. the node it left forgets it, writing nothing. Had 2 or 3 failed, it would keep it
   instead, hibernated, and the move fails with the reason.

Only the front's key can do 1, 3 and 4: a checkpoint holds the sandbox's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING, Any

import httpx

from corral.core.errors import CorralError, InvalidRequest, LimitReached, ServiceUnavailable
from corral.core.state import SandboxState
from corral.server.cluster import placement
from corral.server.cluster.moves import copy
from corral.server.cluster.placement import Node
from corral.server.schemas import SandboxOut

if TYPE_CHECKING:
    from corral.server.cluster.front import Front

log = logging.getLogger("corral.cluster")

MOVABLE = {SandboxState.RUNNING.value, SandboxState.PAUSED.value, SandboxState.HIBERNATED.value}


class MoveFailed(Exception):
    """A node refused a step of a move; `answer` is its answer, to relay as it is."""

    def __init__(self, answer: httpx.Response) -> None:
        super().__init__(answer.text[:200])
        self.answer = answer


async def target_for(front: Front, runtime: str, source: Node, wanted: object) -> Node:
    """Where a sandbox of `runtime` on `source` goes: node `wanted`, or the best placement
    picks among the others."""
    if wanted is not None:
        target = placement.named(front.nodes, wanted)
        if target is source:
            raise InvalidRequest(f"the sandbox is on node {source.name} already", code="same_node")
        if placement.state_of(target) != "ready":
            raise LimitReached(
                f"node {target.name} is {placement.state_of(target)}; move to another, or retry "
                "shortly",
                code="no_node_available",
                retry_after=placement.RETRY_AFTER,
            )
        return target
    others = {name: node for name, node in front.nodes.items() if node is not source}
    chosen = await placement.choose(
        others, front.describe, json.dumps({"runtime": runtime}).encode()
    )
    assert chosen is not None  # the body is an object
    return chosen[0][0]


async def move(front: Front, sandbox_id: str, source: Node, target: Node) -> dict[str, Any]:
    """Move sandbox `sandbox_id` from `source` to `target`; its entry there. Raises
    `MoveFailed` with a node's refusal, `ServiceUnavailable` if a node did not answer."""
    auth, base = front.admin_headers(), f"/v1/sandboxes/{sandbox_id}"
    try:
        handed = await front.http.post(
            f"{source.url}{base}/hand-off", headers=auth, json={"to": target.name}
        )
    except httpx.HTTPError as exc:
        raise unanswered(source, exc) from None
    if handed.status_code != 200:
        raise MoveFailed(handed)
    out = handed.json()
    try:
        entry = await _take_in(front, sandbox_id, out, source, target)
    except BaseException as exc:
        arrived = isinstance(exc, Exception) and await _arrived(front, sandbox_id, target)
        if not arrived:  # it stays where it was, hibernated
            with contextlib.suppress(httpx.HTTPError):
                await front.http.delete(f"{source.url}{base}/hand-off", headers=auth)
            if isinstance(exc, httpx.HTTPError):
                raise unanswered(target, exc) from None
            raise
        found = await front.store.get_sandbox(sandbox_id)
        assert found is not None
        entry = SandboxOut.of(found[1]).model_dump(mode="json")
    front.located[sandbox_id] = target.name
    try:
        await front.http.post(f"{source.url}{base}/hand-off/done", headers=auth)
    except httpx.HTTPError as exc:  # its copy there is stale: a restart there drops it
        log.warning("node %s did not forget moved sandbox %s: %s", source.name, sandbox_id, exc)
    return entry


async def _take_in(
    front: Front, sandbox_id: str, handed: dict[str, Any], source: Node, target: Node
) -> dict[str, Any]:
    """Steps 2 and 3: the hand-off's snapshot copied to `target`, which takes the sandbox in."""
    snapshot_id = handed["snapshot"]["id"]
    await copy(front, snapshot_id, source, target)
    taken = await front.http.post(
        f"{target.url}/v1/sandboxes/{sandbox_id}/take-in",
        headers=front.admin_headers(),
        json={
            "snapshot": snapshot_id,
            "timeout_remaining": handed["sandbox"]["timeout_remaining"],
            "wake": handed["was"] == SandboxState.RUNNING.value,
        },
    )
    if taken.status_code != 201:
        raise MoveFailed(taken)
    entry: dict[str, Any] = taken.json()
    return entry


async def _arrived(front: Front, sandbox_id: str, target: Node) -> bool:
    """Whether `target` took the sandbox in after all (its answer was lost on the way): the
    store says so. Then the move is done, and the old node must not keep it."""
    try:
        found = await front.store.get_sandbox(sandbox_id)
    except Exception:  # the store cannot say: the move failed, as far as anyone knows
        return False
    return found is not None and found[1].node == target.name


def unanswered(node: Node, exc: Exception) -> ServiceUnavailable:
    return ServiceUnavailable(
        f"node {node.name} did not answer during the move ({type(exc).__name__}); see the "
        "sandbox's state, then retry",
        code="node_unavailable",
    )


async def evacuate(front: Front, node: Node) -> None:
    """Move every sandbox of draining node `node` that can move (a checkpointing runtime, no
    volumes, no internet) to the other nodes, one at a time, while it is draining; the rest
    run on there."""
    for info in await front.store.live_sandboxes():
        if not node.draining or node.state != "ready":
            return
        if info.node != node.name or info.state.value not in MOVABLE:
            continue
        try:
            target = await target_for(front, info.runtime, node, None)
            await move(front, info.id, node, target)
            log.info("moved %s from draining node %s to %s", info.id, node.name, target.name)
        except MoveFailed as failed:
            log.info("%s stays on node %s: %s", info.id, node.name, failed)
        except (CorralError, httpx.HTTPError, KeyError, ValueError) as exc:
            log.warning("could not move %s off node %s: %s", info.id, node.name, exc)
        await asyncio.sleep(0)
