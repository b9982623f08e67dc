"""HTTP routes for the audit log: read it, and replay a sandbox's recorded actions."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from corral.server import audit
from corral.server.auth import AuditDep
from corral.server.schemas import Request

router = APIRouter(prefix="/v1/audit", tags=["audit"])


class ReplayBody(Request):
    sandbox_id: str = Field(description="the sandbox whose recorded actions run again")
    snapshot: str = Field(description="the id or name of the snapshot to fork them from")
    keep: bool = Field(False, description="keep the fork running afterwards (else it ends)")


class AuditQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str | None = Field(None, description="a key's id (admin keys; others read their own)")
    sandbox: str | None = Field(None, description="a sandbox's id")
    operation: str | None = Field(None, description="exec, code, files.write, ...")
    since: float | None = Field(None, description="unix seconds, from")
    until: float | None = Field(None, description="unix seconds, before")
    cursor: int | None = Field(None, ge=0, le=2**63 - 1, description="the previous page's `next`")
    order: Literal["asc", "desc"] = "asc"
    limit: int = Field(100, description="entries per page, 1 to 1000")


@router.get("")
async def read_audit(trail: AuditDep, query: Annotated[AuditQuery, Query()]) -> dict[str, Any]:
    """Audit entries matching every filter given: an admin key reads every key's, another
    key its own. Pages: pass the answer's `next` as `cursor` (null when there are no more)."""
    audit.name("audit.read", **query.model_dump(exclude_defaults=True))  # reading is recorded
    entries = await trail.query(
        key_id=query.key, sandbox_id=query.sandbox, operation=query.operation,
        since=query.since, until=query.until, cursor=query.cursor,
        newest_first=query.order == "desc", limit=query.limit,
    )  # fmt: skip
    more = len(entries) == query.limit
    return {"entries": [e.to_dict() for e in entries], "next": entries[-1].id if more else None}


@router.post("/replay", response_class=StreamingResponse)
async def replay(body: ReplayBody, trail: AuditDep) -> Response:
    """Run a sandbox's recorded commands and code again, in order, in a new sandbox from one
    of your snapshots, and compare each outcome with the recorded one; JSON lines
    (`application/x-ndjson`): `started`, one `step` each, then `end`."""
    audit.name("audit.replay", snapshot=body.snapshot, keep=body.keep)
    audit.concerns(body.sandbox_id)
    events = await trail.replay(body.sandbox_id, body.snapshot, body.keep)

    async def lines() -> AsyncIterator[bytes]:
        async for event in events:
            yield (json.dumps(event, separators=(",", ":")) + "\n").encode()

    return StreamingResponse(lines(), media_type="application/x-ndjson")
