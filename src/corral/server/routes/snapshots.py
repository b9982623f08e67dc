"""HTTP routes for memory snapshots: take, list, look up and delete them; and their archives,
with which a cluster's front copies a snapshot from one node to another (admin keys only)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from corral.server.auth import SnapshotArchivesDep, SnapshotsDep
from corral.server.resources.archives import DIGEST_HEADER, IMAGE_HEADER
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


@router.get("/snapshots/{snapshot_id}/archive", tags=["nodes"])
async def pack_snapshot(snapshot_id: str, archives: SnapshotArchivesDep) -> FileResponse:
    """The snapshot as a tar archive, its SHA-256 in `X-Corral-Digest` and the image its
    sandboxes start from in `X-Corral-Image` (the front's key only)."""
    archive, digest, image = await archives.pack(snapshot_id)
    return FileResponse(
        archive,
        media_type="application/x-tar",
        headers={DIGEST_HEADER: digest, IMAGE_HEADER: image},
        background=BackgroundTask(archive.unlink, missing_ok=True),
    )


@router.put("/snapshots/{snapshot_id}/archive", status_code=201, tags=["nodes"])
async def install_snapshot(
    snapshot_id: str, request: Request, archives: SnapshotArchivesDep
) -> SnapshotOut:
    """Install a snapshot from another node's archive, checked against `X-Corral-Digest`
    (admin keys only)."""
    digest = request.headers.get(DIGEST_HEADER)
    return SnapshotOut.of(await archives.install(snapshot_id, request.stream(), digest))
