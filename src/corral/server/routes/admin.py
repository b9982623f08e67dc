"""HTTP routes for admins: every tenant's sandboxes, to see and to end (admin keys only)."""

from __future__ import annotations

from fastapi import APIRouter

from corral.server.auth import AllSandboxesDep
from corral.server.schemas import OwnedSandboxOut, SandboxOut

router = APIRouter(prefix="/v1/admin", tags=["admin"])


@router.get("/sandboxes")
async def list_all_sandboxes(sandboxes: AllSandboxesDep) -> list[OwnedSandboxOut]:
    """Every live sandbox of every key, with the id of the key that owns it."""
    return [
        OwnedSandboxOut(owner=owner, sandbox=SandboxOut.of(info))
        for owner, info in sandboxes.list()
    ]


@router.delete("/sandboxes/{sandbox_id}")
async def end_any_sandbox(sandbox_id: str, sandboxes: AllSandboxesDep) -> SandboxOut:
    """End any live sandbox, whoever owns it (reason `terminated_by_admin`)."""
    return SandboxOut.of(await sandboxes.terminate(sandbox_id))
