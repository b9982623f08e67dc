"""Archives the front streams from one node to another (snapshots, built images): the holder
packs and names the SHA-256, the archive passes through the front untouched, and the other
node checks the digest before it installs anything."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx

from corral.core.errors import ServiceUnavailable
from corral.server.cluster.placement import Node
from corral.server.resources.archives import DIGEST_HEADER, IMAGE_HEADER

if TYPE_CHECKING:
    from corral.server.cluster.front import Front


async def copy_archive(
    front: Front, path: str, source: Node, target: Node, *, what: str, code: str
) -> str:
    """Stream the archive at `path` from `source` to `target`, its digest along (nothing if
    `target` has it already); the image the source names (`X-Corral-Image`, a snapshot's),
    or "". Fails with `code` (503), saying which of `what` and why."""
    auth = front.admin_headers()
    try:
        async with front.http.stream("GET", source.url + path, headers=auth) as packed:
            if packed.status_code != 200:
                await packed.aread()
                raise _failed(what, code, source, target, packed)
            digest = {DIGEST_HEADER: packed.headers.get(DIGEST_HEADER, "")}
            image = str(packed.headers.get(IMAGE_HEADER, ""))
            installed = await front.http.put(
                target.url + path, headers={**auth, **digest}, content=packed.aiter_raw()
            )
    except httpx.HTTPError as exc:
        raise ServiceUnavailable(
            f"copying {what} from node {source.name} to node {target.name} failed "
            f"({type(exc).__name__}); retry",
            code=code,
        ) from None
    if installed.status_code != 201 and error_code(installed) != "snapshot_exists":
        raise _failed(what, code, source, target, installed)
    return image


def error_code(answer: httpx.Response) -> str | None:
    """The `error.code` of a node's answer, if it has one."""
    try:
        code = answer.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
    return code if isinstance(code, str) else None


def _failed(
    what: str, code: str, source: Node, target: Node, answer: httpx.Response
) -> ServiceUnavailable:
    return ServiceUnavailable(
        f"copying {what} from node {source.name} to node {target.name} failed "
        f"({answer.status_code} {error_code(answer) or answer.text[:200]}); retry",
        code=code,
    )
