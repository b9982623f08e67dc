"""Building images through a server: upload local content, stream progress, get the image."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from corral.client._client import AsyncClient, default_client
from corral.errors import ImageBuildFailed, ServiceUnavailable
from corral.models import BuildEvent, BuiltImage

if TYPE_CHECKING:
    from corral.image import Image

CHUNK = 1024 * 1024


async def build_image(
    image: Image,
    name: str | None = None,
    *,
    client: AsyncClient | None = None,
    on_progress: Callable[[BuildEvent], object] | None = None,
) -> BuiltImage:
    """Build `image` on the server (see `Image.build`)."""
    client = client or default_client()
    with image.local_content() as files:
        blobs = {}
        for index, path in files.items():
            blobs[index] = await _upload(client, path)
        recipe = image.recipe(blobs)
    body = {"recipe": recipe, "name": name}
    async with client.stream("POST", "/v1/images", json=body) as response:
        async for line in response.aiter_lines():
            if not line.strip():
                continue
            event = json.loads(line)
            kind = event.get("event")
            if kind == "done":
                return BuiltImage.from_dict(event["image"])
            if kind == "error":
                error = event["error"]
                raise ImageBuildFailed(
                    error["message"],
                    code=error["code"],
                    step=event.get("step") or 0,
                    log=event.get("log") or "",
                )
            if on_progress is not None:
                on_progress(
                    BuildEvent(
                        kind=kind,
                        step=event["step"],
                        steps=event.get("steps"),
                        description=event.get("description"),
                        cached=event.get("cached"),
                        line=event.get("line"),
                    )
                )
    raise ServiceUnavailable("the server ended the build's stream without a result; retry")


async def _upload(client: AsyncClient, path: Path) -> str:
    """Send a file's content unless the server has it already; its digest."""
    digest = "sha256:" + await asyncio.to_thread(_sha256, path)
    if not await client.has_blob(digest):
        await client.request("PUT", f"/v1/blobs/{digest}", content=_read(path))
    return digest


def _sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


async def _read(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            yield chunk
