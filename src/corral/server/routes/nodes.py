"""HTTP routes for the nodes: the machines whose engines run sandboxes (admin keys only)."""

from __future__ import annotations

from fastapi import APIRouter

from corral.server.auth import NodesDep
from corral.server.schemas import NodeOut

router = APIRouter(prefix="/v1", tags=["nodes"])


@router.get("/nodes")
async def list_nodes(nodes: NodesDep) -> list[NodeOut]:
    """Each node: its runtimes, capacity, what its sandboxes ask for, load and pools."""
    return [NodeOut(**node.to_dict()) for node in nodes.list()]


@router.post("/nodes/{name}/drain")
async def drain_node(name: str, nodes: NodesDep) -> NodeOut:
    """Place no new sandboxes on a cluster's node. Served by a cluster's front
    (docs/cluster.md), which marks the node itself so that every front knows; a server on its
    own is one machine, and says so."""
    return NodeOut(**nodes.drain(name, draining=True).to_dict())


@router.delete("/nodes/{name}/drain")
async def undrain_node(name: str, nodes: NodesDep) -> NodeOut:
    """Place sandboxes on the cluster's node again."""
    return NodeOut(**nodes.drain(name, draining=False).to_dict())
