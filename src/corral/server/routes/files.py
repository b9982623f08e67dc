"""HTTP routes for a sandbox's files: streamed upload and download, list, stat and changes.

Paths are sandbox paths, resolved by the guest agent inside the sandbox (see `corral.engine.files`),
so no path or symlink in a request can reach the host's files.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from corral.server import audit
from corral.server.auth import SandboxesDep
from corral.server.metrics import FILE_BYTES
from corral.server.schemas import Chmod, FileOut, MakeDir, Rename, Written

router = APIRouter(prefix="/v1/sandboxes/{sandbox_id}/files", tags=["files"])


@router.get("/content", response_class=StreamingResponse)
async def download(sandbox_id: str, path: str, sandboxes: SandboxesDep) -> Response:
    """The file's bytes, streamed (any size)."""
    audit.name("files.read", path=path)
    files = await sandboxes.files(sandbox_id)
    chunks = files.read(path)
    # Pull the first chunk now, so a missing file is a 404 rather than a broken stream.
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        first = b""

    async def body() -> AsyncIterator[bytes]:
        try:
            async with sandboxes.active(sandbox_id):  # a transfer under way is use
                if first:
                    FILE_BYTES.labels("out").inc(len(first))
                    yield first
                async for chunk in chunks:
                    FILE_BYTES.labels("out").inc(len(chunk))
                    yield chunk
        finally:
            await chunks.aclose()  # a client that goes away cancels the read in the sandbox

    return StreamingResponse(body(), media_type="application/octet-stream")


@router.put("/content", status_code=201)
async def upload(
    sandbox_id: str,
    *,
    path: str,
    request: Request,
    sandboxes: SandboxesDep,
    mode: int | None = None,
    append: bool = False,
) -> Written:
    """Write the request body to `path` (parents created), streamed; any size the disk holds.

    A whole-file write is atomic: an interrupted upload leaves the previous content.
    """
    audit.name("files.write", path=path, append=append)
    files = await sandboxes.files(sandbox_id)
    with sandboxes.hold("upload"):
        async with sandboxes.active(sandbox_id):  # a transfer under way is use
            written = await files.write(path, request.stream(), mode=mode, append=append)
    FILE_BYTES.labels("in").inc(written)
    return Written(path=path, bytes=written)


@router.get("")
async def list_files(
    sandbox_id: str, path: str, sandboxes: SandboxesDep, depth: int = 1
) -> list[FileOut]:
    """What is under the directory `path`, down to `depth` levels."""
    files = await sandboxes.files(sandbox_id)
    return [FileOut.of(info) for info in await files.list(path, depth)]


@router.get("/stat")
async def stat(sandbox_id: str, path: str, sandboxes: SandboxesDep) -> FileOut:
    """What is at `path` (a symlink is described, not followed)."""
    return FileOut.of(await (await sandboxes.files(sandbox_id)).stat(path))


@router.post("/mkdir", status_code=201)
async def mkdir(sandbox_id: str, body: MakeDir, sandboxes: SandboxesDep) -> FileOut:
    audit.name("files.mkdir", path=body.path, parents=body.parents, mode=body.mode)
    files = await sandboxes.files(sandbox_id)
    return FileOut.of(await files.mkdir(body.path, parents=body.parents, mode=body.mode))


@router.delete("", status_code=204)
async def remove(
    sandbox_id: str, path: str, sandboxes: SandboxesDep, recursive: bool = False
) -> Response:
    """Remove a file, or a directory (non-empty ones need `recursive=true`)."""
    audit.name("files.remove", path=path, recursive=recursive)
    await (await sandboxes.files(sandbox_id)).remove(path, recursive=recursive)
    return Response(status_code=204)


@router.post("/rename")
async def rename(sandbox_id: str, body: Rename, sandboxes: SandboxesDep) -> FileOut:
    audit.name("files.rename", path=body.src, to=body.dst, overwrite=body.overwrite)
    files = await sandboxes.files(sandbox_id)
    return FileOut.of(await files.rename(body.src, body.dst, overwrite=body.overwrite))


@router.post("/chmod")
async def chmod(sandbox_id: str, body: Chmod, sandboxes: SandboxesDep) -> FileOut:
    audit.name("files.chmod", path=body.path, mode=body.mode)
    return FileOut.of(await (await sandboxes.files(sandbox_id)).chmod(body.path, body.mode))
