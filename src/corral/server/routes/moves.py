"""HTTP routes for sandboxes moving between a cluster's nodes (docs/cluster.md). A move is
asked of the front; the hand-off and take-in routes are the nodes' side of it, for the
front's key only."""

from __future__ import annotations

from fastapi import APIRouter, Response

from corral.core.errors import InvalidRequest
from corral.server.auth import MovesDep, SandboxesDep
from corral.server.schemas import HandOff, HandOffOut, Move, SandboxOut, SnapshotOut, TakeIn

router = APIRouter(prefix="/v1", tags=["nodes"])


@router.post("/sandboxes/{sandbox_id}/move")
async def move(sandbox_id: str, body: Move, sandboxes: SandboxesDep) -> SandboxOut:
    """Move a sandbox to another node of a cluster, keeping its id, memory and files
    (hibernated there; a running one is woken). Served by a cluster's front."""
    await sandboxes.info(sandbox_id)  # the caller's, or not found
    raise InvalidRequest(
        f"this server is not a cluster's front: sandbox {sandbox_id} has no other node to move "
        "to; snapshot it and start the snapshot on another server instead",
        code="not_a_cluster",
    )


@router.post("/sandboxes/{sandbox_id}/hand-off")
async def hand_off(sandbox_id: str, body: HandOff, moves: MovesDep) -> HandOffOut:
    """Hibernate the sandbox for another node, its checkpoint as a snapshot (front only)."""
    taken, was, info = await moves.hand_off(sandbox_id, body.to)
    return HandOffOut(snapshot=SnapshotOut.of(taken), was=was.value, sandbox=SandboxOut.of(info))


@router.delete("/sandboxes/{sandbox_id}/hand-off")
async def keep(sandbox_id: str, moves: MovesDep) -> SandboxOut:
    """The move failed: the sandbox stays on this node, hibernated (front only)."""
    return SandboxOut.of(await moves.stay(sandbox_id))


@router.post("/sandboxes/{sandbox_id}/hand-off/done", status_code=204)
async def handed_off(sandbox_id: str, moves: MovesDep) -> Response:
    """The sandbox lives on another node now: this one forgets it (front only)."""
    await moves.gone(sandbox_id)
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/take-in", status_code=201)
async def take_in(sandbox_id: str, body: TakeIn, moves: MovesDep) -> SandboxOut:
    """Take in a sandbox another node handed off, from its copied snapshot (front only)."""
    taken = await moves.take_in(sandbox_id, body.snapshot, body.timeout_remaining, wake=body.wake)
    return SandboxOut.of(taken)
