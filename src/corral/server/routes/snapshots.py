"""HTTP routes for memory snapshots: take, list, look up and delete them."""

from __future__ import annotations

from fastapi import APIRouter, Response

from corral.server.auth import SnapshotsDep
from corral.server.schemas import SnapshotOut, TakeSnapshot

router = APIRouter(prefix="/v1", tags=["snapshots"])


@router.post("/sandboxes/{sandbox_id}/snapshot", status_code=201)
async def take_snapshot(
    sandbox_id: str, body: TakeSnapshot, snapshots: SnapshotsDep
) -> SnapshotOut:
    """Save memory and files (gvisor); the sandbox goes on. New sandboxes start from it."""
    return SnapshotOut.of(await snapshots.take(sandbox_id, body.name, body.ttl))


@router.get("/snapshots")
async def list_snapshots(snapshots: SnapshotsDep) -> list[SnapshotOut]:
    """Your snapshots, oldest first."""
    return [SnapshotOut.of(info) for info in snapshots.list()]


@router.get("/snapshots/{ref}")
async def get_snapshot(ref: str, snapshots: SnapshotsDep) -> SnapshotOut:
    return SnapshotOut.of(snapshots.get(ref))


@router.delete("/snapshots/{ref}", status_code=204)
async def delete_snapshot(ref: str, snapshots: SnapshotsDep) -> Response:
    """Delete a snapshot (sandboxes started from it are not affected)."""
    await snapshots.delete(ref)
    return Response(status_code=204)
