"""One tenant's webhooks: register, list, delete (see `corral.server.webhooks`)."""

from __future__ import annotations

from typing import Any

from corral.server.tenancy import Tenant
from corral.server.webhooks import Webhook, Webhooks


class TenantWebhooks:
    """The webhooks of one key: its own sandboxes' events go to them."""

    def __init__(self, tenant: Tenant) -> None:
        self._tenant = tenant
        hooks = tenant.service.webhooks
        assert hooks is not None, "the service is not started"
        self._hooks: Webhooks = hooks

    async def create(self, url: Any, events: Any) -> tuple[Webhook, str]:
        return await self._hooks.add(self._tenant.id, url, events)

    async def list(self) -> list[Webhook]:
        return await self._hooks.of(self._tenant.id)

    async def delete(self, hook_id: str) -> Webhook:
        return await self._hooks.remove(self._tenant.id, hook_id)
