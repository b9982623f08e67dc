"""What the node's operators manage: warm pools and API keys. Listing pools is open to every
key; changing them, and everything about keys, needs an admin key (checked by the routes'
dependency, `corral.server.auth.admin_tenant`)."""

from __future__ import annotations

from typing import Any

from corral.core.spec import SandboxSpec
from corral.server.store import ApiKey
from corral.server.tenancy import Tenant


class Pools:
    """The node's warm pools."""

    def __init__(self, tenant: Tenant) -> None:
        self._engine = tenant.service.engine

    def list(self) -> list[dict[str, Any]]:
        return self._engine.list_pools()

    def set(self, name: str, template: SandboxSpec, size: int) -> dict[str, Any]:
        return self._engine.configure_pool(name, template, size)

    def remove(self, name: str) -> None:
        self._engine.remove_pool(name)


class Keys:
    """The node's API keys (never their secrets, but once, on creation)."""

    def __init__(self, tenant: Tenant) -> None:
        self._store = tenant.service.store

    async def list(self) -> list[ApiKey]:
        return await self._store.list_keys()

    async def create(self, name: str, *, admin: bool) -> tuple[ApiKey, str]:
        return await self._store.create_key(name, admin=admin)

    async def revoke(self, key_id: str) -> ApiKey:
        return await self._store.revoke_key(key_id)
