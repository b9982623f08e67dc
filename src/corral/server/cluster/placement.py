"""The cluster's nodes as the front knows them, and where a create goes: a ready node that has
the runtime and room, preferring a warm pool hit, then the emptiest (sandboxes spread by
default); a `node` field in the body names one."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from corral.core.errors import InvalidRequest, LimitReached

RETRY_AFTER = 5


@dataclass
class Node:
    name: str
    index: int | None  # its host scope (a local node's Ray resource is `corral_node_<index>`)
    url: str
    state: str = "starting"  # starting, ready, losing (its sandboxes are being ended), lost
    detail: str | None = None
    draining: bool = False  # no new sandboxes; those it has run on and are reached as ever
    drains: int = 0  # drains and undrains made through this front, to tell stale answers by


Describe = Callable[[Node], Awaitable[dict[str, Any] | None]]


async def choose(
    nodes: Mapping[str, Node], describe: Describe, body: bytes
) -> tuple[list[Node], bytes] | None:
    """The nodes to try, best first, and the body to send them (without `node`); None when
    the body is not a JSON object (a node will say what is wrong with it). `describe` asks a
    node for its own view of itself (None: it does not answer)."""
    try:
        spec = json.loads(body or b"{}")
    except ValueError:
        return None
    if not isinstance(spec, dict):
        return None
    wanted = spec.pop("node", None)
    if wanted is not None:
        named(nodes, wanted)
    candidates = [
        node for node in nodes.values() if node.state == "ready" and wanted in (None, node.name)
    ]  # a draining one too: it says whether it still is (another front may have changed it)
    seen = await asyncio.gather(*(describe(node) for node in candidates))
    runtime = spec.get("runtime")
    able = [
        (node, info)
        for node, info in zip(candidates, seen, strict=True)
        if info is not None
        and not node.draining  # as the node said just now (`describe`)
        and info.get("state") != "draining"
        and (runtime is None or runtime in info["runtimes"])
    ]
    if not able:
        raise LimitReached(
            "no node of the cluster can take this sandbox now"
            + (f" (node {wanted} is {state_of(nodes[wanted])})" if wanted else "")
            + (f" (none runs {runtime})" if runtime else "")
            + "; retry shortly",
            code="no_node_available",
            retry_after=RETRY_AFTER,
        )
    able.sort(key=lambda pair: _rank(pair[1], spec))
    return [node for node, _ in able], json.dumps(spec).encode()


def named(nodes: Mapping[str, Node], wanted: object) -> Node:
    """The node called `wanted`, or a clear refusal."""
    if not isinstance(wanted, str) or wanted not in nodes:
        raise InvalidRequest(
            f"no node {wanted!r} in this cluster; see corral nodes list", code="node_not_found"
        )
    return nodes[wanted]


def state_of(node: Node) -> str:
    """As `corral nodes list` shows it: `draining` for a ready node that takes no more,
    `unreachable` for one being lost (it is listed `lost` once its sandboxes have ended)."""
    if node.state == "losing":
        return "unreachable"
    return "draining" if node.draining and node.state == "ready" else node.state


def _rank(info: dict[str, Any], spec: dict[str, Any]) -> tuple[int, float]:
    """Lower is better: a node with an idle pooled sandbox of this runtime first, then the one
    whose live sandboxes ask for the smallest share of its CPUs."""
    runtime = spec.get("runtime")
    hit = any(
        pool["idle"] > 0 and (runtime is None or pool["runtime"] == runtime)
        for pool in info.get("pools", ())
    )
    share = info["allocated"]["cpu"] / max(info["capacity"]["cpu"], 1e-9)
    return (0 if hit else 1, share)


def node_entry(node: Node, seen: dict[str, Any] | None) -> dict[str, Any]:
    """Node `node` as `GET /v1/nodes` lists it: its own view when it answers, else its state."""
    if seen is not None and node.state == "ready":
        return {**seen, "state": state_of(node)}
    empty = {"cpu": 0.0, "memory_mb": 0.0, "disk_mb": 0.0}
    return {
        "name": node.name, "state": "unreachable" if node.state == "ready" else state_of(node),
        "runtimes": [], "sandboxes": 0, "max_sandboxes": 0, "capacity": empty,
        "allocated": empty, "load": 0.0, "memory_available_mb": 0, "pools": [],
        "scope": node.index, "detail": node.detail,
    }  # fmt: skip
