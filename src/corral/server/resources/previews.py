"""Previews for one tenant: open a port of one of its sandboxes to HTTP clients, list and
revoke them. (Serving them: `corral.server.previews`.)"""

from __future__ import annotations

import secrets
import time

from corral.core.errors import InvalidRequest, LimitReached, NotFound, SandboxNotFound
from corral.core.ids import new_id
from corral.core.state import SandboxState
from corral.server.previews.gateway import TOKEN_PREFIX
from corral.server.previews.grants import digest
from corral.server.previews.store import PreviewEntry
from corral.server.tenancy import Tenant

MAX_PER_SANDBOX = 100
MAX_TTL = 30 * 24 * 3600.0


class Previews:
    """The previews of one tenant's sandboxes."""

    def __init__(self, tenant: Tenant) -> None:
        self._tenant = tenant
        self._service = tenant.service

    async def create(
        self, sandbox_id: str, port: int, *, public: bool, ttl: float | None
    ) -> tuple[PreviewEntry, str]:
        """A new preview of `port` and its token (shown this once: the store keeps a digest)."""
        sandbox_id = await self._tenant.sandbox(sandbox_id)
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise InvalidRequest("port must be a whole number from 1 to 65535")
        if ttl is not None and not 1 <= ttl <= MAX_TTL:
            raise InvalidRequest(f"ttl must be 1 to {MAX_TTL:g} seconds (30 days), or left out")
        if self._service.engine.get(sandbox_id).state is SandboxState.TERMINATED:
            raise SandboxNotFound(f"sandbox {sandbox_id} has ended")
        if len(await self.list(sandbox_id)) >= MAX_PER_SANDBOX:
            raise LimitReached(
                f"sandbox {sandbox_id} has {MAX_PER_SANDBOX} previews; revoke some first",
                code="too_many_previews",
            )
        token = TOKEN_PREFIX + secrets.token_urlsafe(24)
        now = time.time()
        entry = PreviewEntry(
            id=new_id("pv"),
            owner=self._tenant.id,
            sandbox_id=sandbox_id,
            port=port,
            public=public,
            created_at=now,
            expires_at=now + ttl if ttl is not None else None,
        )
        await self._service.store.previews.add(entry, digest(token))
        if public:
            self._service.grants.forget()  # a cached "not public" must not linger
        return entry, token

    async def list(self, sandbox_id: str) -> list[PreviewEntry]:
        """The sandbox's previews that are neither revoked nor expired, oldest first."""
        sandbox_id = await self._tenant.sandbox(sandbox_id)
        return await self._service.store.previews.of_sandbox(self._tenant.id, sandbox_id)

    async def revoke(self, sandbox_id: str, preview_id: str) -> None:
        """Revoke a preview: its token and (if public) its open port stop working at once."""
        sandbox_id = await self._tenant.sandbox(sandbox_id)
        found = await self._service.store.previews.revoke(self._tenant.id, sandbox_id, preview_id)
        if found is None:
            raise NotFound(
                f"sandbox {sandbox_id} has no preview {preview_id!r}", code="preview_not_found"
            )
        self._service.grants.forget()
