"""Built images across a cluster's nodes. An image is built on the node that got the build;
a node that is to run a sandbox of it (a create placed there, a sandbox moved there, a start
from a snapshot copied there) gets a copy first, from a node that has it whole
(`corral.images.transfer`). The copy stays. Built-in images each node makes itself."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import quote

import httpx

from corral.core.names import BUILTIN_IMAGES
from corral.server.cluster.archives import copy_archive
from corral.server.cluster.limits import bearer_key
from corral.server.cluster.placement import Node

if TYPE_CHECKING:
    from corral.server.cluster.front import Front


def _path(image: str) -> str:
    return f"/v1/images/{quote(image, safe='')}/archive"


async def has(front: Front, node: Node, image: str) -> bool:
    """Whether `node` has built image `image` whole."""
    try:
        held = await front.http.head(node.url + _path(image), headers=front.admin_headers())
    except httpx.HTTPError:
        return False
    return held.status_code == 204


async def copy(front: Front, image: str, source: Node, target: Node) -> None:
    """Copy built image `image` from `source` to `target` unless `target` has it."""
    if image.startswith("im-") and not await has(front, target, image):
        await copy_archive(
            front, _path(image), source, target, what=f"image {image}", code="image_copy_failed"
        )


async def bring(front: Front, image: str, target: Node) -> None:
    """Built image `image` on `target`, copied from the first ready node that has it (none:
    nothing is done, and `target` says the image is not found)."""
    if not image.startswith("im-") or await has(front, target, image):
        return
    for node in front.ready():
        if node is not target and await has(front, node, image):
            await copy(front, image, node, target)
            return


async def named(front: Front, authorization: str | None, spec: object) -> str | None:
    """The id of the caller's built image that a create's body names (by id or name), or
    None (a built-in image, none, or not the caller's: the node says what is wrong)."""
    ref = spec.get("image") if isinstance(spec, dict) else None
    if not isinstance(ref, str) or not ref or ref in BUILTIN_IMAGES:
        return None
    key = await bearer_key(front.store, authorization)
    entry = await front.store.find_image(key.id, ref) if key is not None else None
    return entry.id if entry is not None else None
