"""HTTP routes for images built from recipes, and the uploads their local files need.

A build is one POST whose answer streams as it happens, one JSON object per line
(`application/x-ndjson`): the events of `corral.images.builder`, then `done` with the image
or `error` with the failed step and its output. A client that goes away cancels its build (the
step under way stops and its sandbox ends); the steps already done stay cached for the next try.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from starlette.background import BackgroundTask

from corral.core.errors import CorralError
from corral.server.auth import AdminImagesDep, ImageArchivesDep, ImagesDep
from corral.server.resources.archives import DIGEST_HEADER
from corral.server.schemas import (
    BlobOut,
    BuildImage,
    ImageOut,
    ImageUsage,
    Pruned,
    SnapshotFilesystem,
)

router = APIRouter(prefix="/v1", tags=["images"])

_builds: set[asyncio.Task[dict[str, Any]]] = set()  # the builds under way


@router.put("/blobs/{digest}", status_code=201)
async def upload_blob(digest: str, request: Request, images: ImagesDep) -> BlobOut:
    """Upload content a recipe names by digest (a tar of copied files, an OCI archive)."""
    return BlobOut(digest=digest, size=await images.add_blob(digest, request.stream()))


@router.head("/blobs/{digest}")
async def has_blob(digest: str, images: ImagesDep) -> Response:
    """200 if the server holds this content already (no need to upload it), else 404."""
    found = await images.has_blob(digest)
    return Response(status_code=200 if found else 404, media_type="application/json")


@router.post("/images", response_class=StreamingResponse)
async def build_image(body: BuildImage, images: ImagesDep) -> Response:
    """Build a recipe; the answer streams progress events, one JSON object per line."""
    await images.check(body.recipe, body.name)  # refused with a 4xx, before any streaming
    finished = images.start_build()
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    task = asyncio.create_task(images.build(body.recipe, body.name, events.put_nowait))
    _builds.add(task)
    task.add_done_callback(_builds.discard)
    task.add_done_callback(lambda _task: finished())

    async def lines() -> AsyncIterator[bytes]:
        try:
            while not (task.done() and events.empty()):
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield _line(getter.result())
                else:
                    getter.cancel()
            error = task.exception()
            if error is None:
                yield _line({"event": "done", "image": task.result()})
            elif isinstance(error, CorralError):
                yield _line(
                    {
                        "event": "error",
                        "step": getattr(error, "step", None),
                        "log": getattr(error, "log", ""),
                        **error.to_dict(),
                    }
                )
            else:
                yield _line(
                    {
                        "event": "error",
                        "error": {"code": "internal_error", "message": "build failed"},
                    }
                )
                raise error
        finally:
            if not task.done():  # its client went away: the build stops, its sandbox ends
                task.cancel()

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.post("/sandboxes/{sandbox_id}/filesystem-snapshot", status_code=201)
async def snapshot_filesystem(
    sandbox_id: str, body: SnapshotFilesystem, images: ImagesDep
) -> ImageOut:
    """A new image of yours: the sandbox's image plus everything the sandbox changed."""
    return ImageOut(**await images.snapshot_filesystem(sandbox_id, body.name))


@router.get("/images")
async def list_images(images: ImagesDep) -> list[ImageOut]:
    """Your images, oldest first."""
    return [ImageOut(**image) for image in await images.list()]


@router.get("/images/usage")
async def image_usage(images: ImagesDep) -> ImageUsage:
    """Disk used by every layer and pending upload on this server."""
    return ImageUsage(**await images.usage())


@router.post("/images/prune")
async def prune_images(images: AdminImagesDep) -> Pruned:
    """Free the layers and uploads that no key's image and no live sandbox uses (admin)."""
    return Pruned(**await images.prune())


@router.get("/images/{ref}")
async def get_image(ref: str, images: ImagesDep) -> ImageOut:
    """One of your images, by id or name."""
    return ImageOut(**await images.describe(ref))


@router.delete("/images/{ref}", status_code=204)
async def remove_image(ref: str, images: ImagesDep) -> Response:
    """Forget one of your images; `prune` frees its layers if nothing else uses them."""
    await images.remove(ref)
    return Response(status_code=204)


def _line(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode() + b"\n"


@router.head("/images/{image_id}/archive", status_code=204, tags=["nodes"])
async def has_image(image_id: str, archives: ImageArchivesDep) -> Response:
    """204 if this node has the built image whole, else 404 (the front's key only)."""
    archives.has(image_id)
    return Response(status_code=204)


@router.get("/images/{image_id}/archive", tags=["nodes"])
async def pack_image(image_id: str, archives: ImageArchivesDep) -> FileResponse:
    """The built image (manifest and layers) as a tar archive, its SHA-256 in
    `X-Corral-Digest` (the front's key only)."""
    archive, digest = await archives.pack(image_id)
    return FileResponse(
        archive,
        media_type="application/x-tar",
        headers={DIGEST_HEADER: digest},
        background=BackgroundTask(archive.unlink, missing_ok=True),
    )


@router.put("/images/{image_id}/archive", status_code=201, tags=["nodes"])
async def install_image(
    image_id: str, request: Request, archives: ImageArchivesDep
) -> dict[str, Any]:
    """Install a built image from another node's archive, checked against `X-Corral-Digest`
    (the front's key only)."""
    digest = request.headers.get(DIGEST_HEADER)
    return await archives.install(image_id, request.stream(), digest)
