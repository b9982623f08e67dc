"""What the node's operators manage: warm pools, API keys and the nodes. Listing pools is open
to every key; changing them, everything about keys and the nodes need an admin key (checked by
the routes' dependency, `corral.server.auth.admin_tenant`)."""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

from corral.core.egress import EgressPolicy
from corral.core.errors import InvalidRequest, NotFound, PermissionDenied, SandboxNotFound
from corral.core.ids import check_id
from corral.core.models import NodeInfo, SandboxInfo
from corral.core.quota import Quota
from corral.core.spec import SandboxSpec
from corral.core.state import EndReason
from corral.server.metrics import exposition
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
        self._service = tenant.service
        self._store = tenant.service.store

    async def list(self) -> list[ApiKey]:
        return await self._store.list_keys()

    async def create(self, name: str, *, admin: bool) -> tuple[ApiKey, str]:
        return await self._store.create_key(name, admin=admin)

    async def quota(self, key_ref: str, new: Quota | None = None) -> dict[str, Any]:
        """A key's quota and what it takes now, after setting the quota to `new` if given."""
        if new is not None:
            key = await self._store.set_quota(key_ref, new)
            self._service.quotas = await self._store.quotas()
        else:
            key = await self._store.find_key(key_ref)
        quota = self._service.quotas.get(key.id, Quota())
        usage = await self._service.usage(key.id)
        return {"key_id": key.id, "quota": quota.to_dict(), "usage": usage.to_dict()}

    async def network(
        self, key_ref: str, new: EgressPolicy | None = None, *, clear: bool = False
    ) -> dict[str, Any]:
        """A key's default egress rules (null: none), after setting them to `new` (or dropping
        them, with `clear`) if asked."""
        key = await self._store.find_key(key_ref)
        if new is not None or clear:
            await self._store.key_networks.set(key.id, None if clear else new)
            self._service.key_networks = await self._store.key_networks.all()
        rules = self._service.key_networks.get(key.id)
        return {"key_id": key.id, "egress": None if rules is None else rules.to_dict()}

    async def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key: it stops working at once, and its sandboxes end (`key_revoked`)."""
        key = await self._store.revoke_key(key_id)
        await self._service.end_sandboxes_of(key.id)
        await self._service.recorded()  # answered once the store says how they ended
        return key


DRAINING_FILE = "draining"  # in a cluster node's data directory: it takes no new sandboxes


class Nodes:
    """The machines whose engines run sandboxes: this server's own (one node). On a cluster's
    node, also whether it is draining, which its fronts set and read here."""

    def __init__(self, tenant: Tenant) -> None:
        self._tenant = tenant
        self._service = tenant.service
        self._draining = tenant.service.config.data_dir / DRAINING_FILE

    def drain(self, name: str, draining: bool) -> NodeInfo:
        """Mark this cluster node as draining (or not), for every front (a front's key)."""
        if self._service.config.front_key_id is None:
            raise InvalidRequest(
                f"this server is not a cluster's front, so it has no nodes to drain ({name!r}); "
                "to take this machine out of use, stop creating sandboxes on it and stop the "
                "server",
                code="not_a_cluster",
            )
        if not self._tenant.key.front:
            raise PermissionDenied(
                "a node is drained through the cluster's front (corral nodes drain NODE)",
                code="cluster_front_only",
            )
        if name != self._service.engine.node:
            raise NotFound(
                f"this node is {self._service.engine.node}, not {name!r}", code="node_not_found"
            )
        if draining:
            self._draining.touch()
        else:
            self._draining.unlink(missing_ok=True)
        return self.list()[0]

    def list(self) -> list[NodeInfo]:
        service, engine = self._service, self._service.engine
        admission = service.admission
        pools = (
            {"name": pool.name, "runtime": pool.template.runtime, "image": pool.template.image,
             "size": pool.size, "idle": len(pool.idle)}
            for pool in engine.pools.list()
        )  # fmt: skip
        cpus = os.cpu_count() or 1
        return [
            NodeInfo(
                name=engine.node,
                state="draining" if self._draining.exists() else "ready",
                runtimes=tuple(n for n, why in engine.runtimes.report().items() if why is None),
                sandboxes=len(engine.registry.live()),
                max_sandboxes=service.config.max_sandboxes,
                capacity=asdict(admission.capacity),
                allocated=asdict(admission.in_use()),
                load=round(os.getloadavg()[0] / cpus, 3),
                memory_available_mb=_available_mb(),
                pools=tuple(pools),
                scope=engine.scope.index,
            )
        ]


def _available_mb() -> int:
    """The machine's available memory (MemAvailable), in MiB."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 0


class AllSandboxes:
    """Every tenant's sandboxes, as an admin sees them: to list, and to end any one."""

    def __init__(self, tenant: Tenant) -> None:
        self._admin = tenant
        self._service = tenant.service

    def list(self) -> list[tuple[str, SandboxInfo]]:
        """Every live sandbox, with the id of the key that owns it."""
        engine = self._service.engine
        return [(owner, engine.get(sid)) for sid, owner in self._service.owners().items()]

    def metrics(self) -> bytes:
        """Every metric of the node, in Prometheus's text format."""
        return exposition(self._service.engine, self._service.owners())

    async def terminate(self, sandbox_id: str) -> SandboxInfo:
        """End any live sandbox (`terminated_by_admin`)."""
        check_id(sandbox_id, "sb")
        if sandbox_id not in self._service.owners():
            raise SandboxNotFound(f"no live sandbox {sandbox_id}")
        detail = f"ended by the admin key {self._admin.key.name!r}"
        return await self._service.engine.terminate(
            sandbox_id, reason=EndReason.ADMIN, detail=detail
        )
