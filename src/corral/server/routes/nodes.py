"""HTTP routes for the nodes: the machines whose engines run sandboxes (admin keys only)."""

from __future__ import annotations

from fastapi import APIRouter

from corral.core.errors import InvalidRequest
from corral.server.auth import NodesDep
from corral.server.schemas import NodeOut

router = APIRouter(prefix="/v1", tags=["nodes"])


@router.get("/nodes")
async def list_nodes(nodes: NodesDep) -> list[NodeOut]:
    """Each node: its runtimes, capacity, what its sandboxes ask for, load and pools."""
    return [NodeOut(**node.to_dict()) for node in nodes.list()]


@router.post("/nodes/{name}/drain")
@router.delete("/nodes/{name}/drain")
async def drain_node(name: str, nodes: NodesDep) -> NodeOut:
    """Place no new sandboxes on a cluster's node (DELETE: place there again). Served by a
    cluster's front (docs/cluster.md); a server on its own is one machine, and says so."""
    raise InvalidRequest(
        f"this server is not a cluster's front, so it has no nodes to drain ({name!r}); to take "
        "this machine out of use, stop creating sandboxes on it and stop the server",
        code="not_a_cluster",
    )
