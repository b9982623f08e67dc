"""HTTP routes for warm pools (changing them needs an admin key)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from corral.core.spec import SandboxSpec
from corral.server.auth import AdminPoolsDep, PoolsDep
from corral.server.schemas import PoolBody, PoolOut

router = APIRouter(prefix="/v1", tags=["pools"])


@router.get("/pools")
async def list_pools(pools: PoolsDep) -> list[PoolOut]:
    """Warm pools: template, target size, idle sandboxes, hits and misses."""
    return [PoolOut(**pool) for pool in pools.list()]


@router.put("/pools/{name}")
async def set_pool(name: str, body: PoolBody, pools: AdminPoolsDep) -> PoolOut:
    """Create or resize a pool; creates whose spec matches its template claim from it."""
    fields = body.model_dump()
    size = fields.pop("size")
    return PoolOut(**pools.set(name, SandboxSpec(**fields), size))


@router.delete("/pools/{name}", status_code=204)
async def remove_pool(name: str, pools: AdminPoolsDep) -> Response:
    """Remove a pool and end its idle sandboxes."""
    pools.remove(name)
    return Response(status_code=204)
