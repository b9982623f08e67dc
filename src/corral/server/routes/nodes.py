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
