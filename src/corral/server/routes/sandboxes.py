"""HTTP routes for sandboxes: create, list, look, change and end them."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from corral.core.egress import EgressPolicy
from corral.core.errors import InvalidRequest
from corral.core.spec import FIXED_AT_START, SandboxSpec
from corral.server.auth import SandboxesDep
from corral.server.schemas import CreateSandbox, Fork, NetworkRulesBody, SandboxOut, SetTimeout

router = APIRouter(prefix="/v1", tags=["sandboxes"])


@router.post("/sandboxes", status_code=201)
async def create_sandbox(body: CreateSandbox, sandboxes: SandboxesDep) -> SandboxOut:
    """Create a sandbox and return once it can run commands."""
    fields = body.model_dump()
    pool, snapshot = fields.pop("pool"), fields.pop("snapshot")
    from_snapshot = (*FIXED_AT_START, "volumes")
    fixed = sorted(body.model_fields_set & set(from_snapshot))
    if snapshot is not None and fixed:
        raise InvalidRequest(
            f"a sandbox from a snapshot has the snapshot's {', '.join(from_snapshot)}; "
            f"leave out {', '.join(fixed)}"
        )
    spec = SandboxSpec.from_dict(fields)
    return SandboxOut.of(await sandboxes.create(spec, pool=pool, snapshot=snapshot))


@router.get("/sandboxes")
async def list_sandboxes(
    sandboxes: SandboxesDep,
    state: str | None = None,
    metadata: Annotated[
        list[str], Query(description="key=value; repeat to match several (all must match)")
    ] = [],  # noqa: B006 - FastAPI copies defaults
) -> list[SandboxOut]:
    """Your sandboxes, oldest first; ended ones stay listed for 7 days."""
    wanted = {}
    for item in metadata:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise InvalidRequest(f"metadata filter {item!r} must read key=value")
        wanted[name] = value
    return [SandboxOut.of(info) for info in await sandboxes.list(state, wanted)]


@router.get("/sandboxes/{sandbox_id}")
async def get_sandbox(sandbox_id: str, sandboxes: SandboxesDep) -> SandboxOut:
    """A sandbox's state, spec (environment values withheld) and, once ended, why."""
    return SandboxOut.of(await sandboxes.info(sandbox_id))


@router.delete("/sandboxes/{sandbox_id}")
async def terminate_sandbox(sandbox_id: str, sandboxes: SandboxesDep) -> SandboxOut:
    """End a sandbox now. Terminating an ended sandbox returns it unchanged."""
    return SandboxOut.of(await sandboxes.terminate(sandbox_id))


@router.post("/sandboxes/{sandbox_id}/timeout")
async def set_timeout(sandbox_id: str, body: SetTimeout, sandboxes: SandboxesDep) -> SandboxOut:
    """Make the sandbox end `timeout` seconds from now (extend or shorten; at most 24 h)."""
    return SandboxOut.of(await sandboxes.set_timeout(sandbox_id, body.timeout))


@router.put("/sandboxes/{sandbox_id}/network")
async def set_network(
    sandbox_id: str, body: NetworkRulesBody, sandboxes: SandboxesDep
) -> SandboxOut:
    """Replace an internet sandbox's egress rules (see docs/network.md); open connections stay."""
    rules = EgressPolicy.parse(body.model_dump())
    return SandboxOut.of(await sandboxes.set_egress(sandbox_id, rules))


@router.post("/sandboxes/{sandbox_id}/pause")
async def pause(sandbox_id: str, sandboxes: SandboxesDep) -> SandboxOut:
    """Freeze every process (memory kept, no CPU used); the lifetime stops too."""
    return SandboxOut.of(await sandboxes.pause(sandbox_id))


@router.post("/sandboxes/{sandbox_id}/resume")
async def resume(sandbox_id: str, sandboxes: SandboxesDep) -> SandboxOut:
    """Thaw a paused sandbox."""
    return SandboxOut.of(await sandboxes.resume(sandbox_id))


@router.post("/sandboxes/{sandbox_id}/hibernate")
async def hibernate(sandbox_id: str, sandboxes: SandboxesDep) -> SandboxOut:
    """Write memory and files to disk and stop (gvisor): no memory, no CPU, no lifetime used."""
    return SandboxOut.of(await sandboxes.hibernate(sandbox_id))


@router.post("/sandboxes/{sandbox_id}/wake")
async def wake(sandbox_id: str, sandboxes: SandboxesDep) -> SandboxOut:
    """Restore a hibernated sandbox exactly where it was."""
    return SandboxOut.of(await sandboxes.wake(sandbox_id))


@router.post("/sandboxes/{sandbox_id}/fork", status_code=201, tags=["snapshots"])
async def fork(sandbox_id: str, body: Fork, sandboxes: SandboxesDep) -> list[SandboxOut]:
    """`count` new sandboxes with this one's memory and files, diverging from now on."""
    return [SandboxOut.of(info) for info in await sandboxes.fork(sandbox_id, body.count)]
