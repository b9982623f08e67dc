"""One tenant's audit trail: what it may read of the audit log, and replays of its sandboxes
(see `corral.server.audit`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from corral.core.audit import AuditEntry
from corral.core.errors import InvalidRequest, PermissionDenied
from corral.core.ids import check_id
from corral.server.audit.log import MAX_PAGE
from corral.server.audit.replay import Replay, recorded_steps
from corral.server.resources.sandboxes import Sandboxes
from corral.server.tenancy import Tenant


class AuditTrail:
    """The audit log as one key sees it: an admin key everyone's entries, another key its own."""

    def __init__(self, tenant: Tenant) -> None:
        self._tenant = tenant
        self._log = tenant.service.audit

    async def query(
        self,
        *,
        key_id: str | None,
        sandbox_id: str | None,
        operation: str | None,
        since: float | None,
        until: float | None,
        cursor: int | None,
        newest_first: bool,
        limit: int,
    ) -> list[AuditEntry]:
        if not self._log.enabled:
            raise InvalidRequest(
                "this server keeps no audit log (corral serve --audit-retention 0)",
                code="audit_disabled",
            )
        if not self._tenant.key.admin:
            if key_id not in (None, self._tenant.id):
                raise PermissionDenied(
                    "a key reads its own audit entries; only an admin key reads another's"
                )
            key_id = self._tenant.id
        if since is not None and until is not None and since >= until:
            raise InvalidRequest(f"since ({since}) must be before until ({until})")
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidRequest(f"limit must be between 1 and {MAX_PAGE}, got {limit}")
        return await self._log.query(
            key_id=key_id, sandbox_id=sandbox_id, operation=operation, since=since,
            until=until, cursor=cursor, newest_first=newest_first, limit=limit,
        )  # fmt: skip

    async def replay(
        self, sandbox_id: str, snapshot: str, keep: bool
    ) -> AsyncIterator[dict[str, Any]]:
        """Replay the key's recorded actions in `sandbox_id` in a fork of `snapshot`: the
        events of `Replay.run`. Errors in the request are raised before the first."""
        check_id(sandbox_id, "sb")
        taken = self._tenant.snapshot(snapshot)
        entries, cut = await recorded_steps(self._log, self._tenant.id, sandbox_id, taken)
        replay = Replay(Sandboxes(self._tenant), taken, keep)
        await replay.start(sandbox_id, entries)
        return replay.run(sandbox_id, entries, cut)
