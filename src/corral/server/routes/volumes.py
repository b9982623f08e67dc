"""HTTP routes for persistent volumes: make, list, describe and delete them (see
docs/volumes.md). Mounting happens in `POST /v1/sandboxes` (`volumes`)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from corral.server.auth import VolumesDep
from corral.server.schemas import CreateVolume, VolumeOut

router = APIRouter(prefix="/v1", tags=["volumes"])


@router.post("/volumes", status_code=201)
async def create_volume(body: CreateVolume, volumes: VolumesDep) -> VolumeOut:
    """Make an empty volume of `size_mb` MiB; 409 `volume_exists` if you have the name."""
    return VolumeOut(**await volumes.create(body.name, body.size_mb))


@router.get("/volumes")
async def list_volumes(volumes: VolumesDep) -> list[VolumeOut]:
    """Your volumes, oldest first."""
    return [VolumeOut(**volume) for volume in await volumes.list()]


@router.get("/volumes/{ref}")
async def get_volume(ref: str, volumes: VolumesDep) -> VolumeOut:
    """One of your volumes, by id or name, with its usage and the sandboxes mounting it."""
    return VolumeOut(**await volumes.describe(ref))


@router.delete("/volumes/{ref}", status_code=204)
async def delete_volume(ref: str, volumes: VolumesDep) -> Response:
    """Delete a volume and its files; 409 `volume_in_use` while live sandboxes mount it."""
    await volumes.delete(ref)
    return Response(status_code=204)
