"""Deployments for one tenant: create, look up, update, delete them, read their logs, and
promote a sandbox to one. (Keeping them served: `corral.server.deployments`.)"""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from typing import Any

from corral.core.errors import InvalidRequest, NotFound
from corral.server.deployments.host import DeploymentHost
from corral.server.deployments.runner import Runner
from corral.server.deployments.spec import DeploymentSpec, check_name
from corral.server.deployments.store import name_taken
from corral.server.resources.images import Images
from corral.server.tenancy import Tenant


class Deployments:
    """The deployments of one tenant."""

    def __init__(self, tenant: Tenant, host: DeploymentHost) -> None:
        self._tenant = tenant
        self._host = host

    async def create(self, spec: DeploymentSpec) -> Runner:
        """A new deployment, serving once this returns (`DeploymentFailed` if it cannot)."""
        return await self._host.create(self._tenant.id, spec)

    def get(self, name: str) -> Runner:
        runner = self._host.runners.get(check_name(name))
        if runner is None or runner.entry.owner != self._tenant.id:
            raise NotFound(
                f"you have no deployment named {name!r} (corral deployments lists yours)",
                code="deployment_not_found",
            )
        return runner

    def list(self) -> builtins.list[Runner]:
        return [r for r in self._host.runners.values() if r.entry.owner == self._tenant.id]

    async def update(self, name: str, changes: Mapping[str, Any]) -> Runner:
        """A new version with `changes`, switched to once healthy; the old one serves until
        then, and on if the new one fails."""
        runner = self.get(name)
        await runner.update(runner.entry.spec.replace(changes))
        return runner

    async def delete(self, name: str) -> None:
        await self._host.delete(self.get(name))

    async def from_sandbox(self, sandbox_id: str, fields: Mapping[str, Any]) -> Runner:
        """Deploy what a sandbox has built: its files become an image (its processes do not
        carry over: `command` starts the service), with its runtime, resources and env."""
        sandbox_id = await self._tenant.sandbox(sandbox_id)
        name = check_name(fields.get("name"))
        if name in self._host.runners:
            raise name_taken(name)
        source = self._tenant.service.engine.get(sandbox_id)
        defaults: dict[str, Any] = {
            "runtime": source.runtime,
            "cpu": source.spec.cpu,
            "memory_mb": source.spec.memory_mb,
            "disk_mb": source.spec.disk_mb,
            "network": source.spec.network,
        }
        given = {k: v for k, v in fields.items() if v is not None}
        if "port" not in given:
            raise InvalidRequest("port is required: the port the sandbox's service listens on")
        env = {**source.spec.env, **(given.pop("env", None) or {})}
        DeploymentSpec(**{**defaults, **given, "env": env, "image": "debian"})  # checked first
        image = await Images(self._tenant).snapshot_filesystem(sandbox_id, None)
        return await self.create(
            DeploymentSpec(**{**defaults, **given, "env": env, "image": image["id"]})
        )
