"""Deployments in the SDK: `AsyncDeployment` and its synchronous twin `Deployment`.

A deployment runs a command from an image (or a memory snapshot) as a long-running service
with a stable URL: restarted when it crashes, health-checked, asleep when idle and woken by the
next request, updated without a failed request. `sandbox.deploy(...)` promotes a sandbox.
"""

from __future__ import annotations

import abc
import builtins
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from corral.client._client import AsyncClient, default_client
from corral.client._sync import (
    Client,
    Twin,
    async_client,
    blocking,
    blocking_iter,
    blocking_self,
    constructor,
    constructor_each,
)


@dataclass(frozen=True)
class AsyncDeployment:
    """A service deployed on the server, as of when it was fetched (`refresh()` again).

    `url` is where anyone reaches it; `status` is starting, running, sleeping, restarting or
    failing; `instance` is the sandbox serving it now; `version` counts its updates.

    Example:
        >>> app = await AsyncDeployment.create(
        ...     "hello", image="debian", command="python3 -m http.server 8000", port=8000
        ... )
        >>> httpx.get(app.url).status_code
        200
        >>> await app.update(env={"MODE": "fast"})  # no failed request meanwhile
    """

    id: str
    name: str
    url: str
    status: str
    version: int
    instance: str | None
    restarts: int
    created_at: float
    updated_at: float
    spec: Mapping[str, Any] = field(default_factory=dict)
    client: AsyncClient | None = field(default=None, repr=False, compare=False)

    @classmethod
    def _from_dict(cls, data: Mapping[str, Any], client: AsyncClient) -> AsyncDeployment:
        return cls(
            id=data["id"],
            name=data["name"],
            url=data["url"],
            status=data["status"],
            version=data["version"],
            instance=data.get("instance"),
            restarts=data.get("restarts", 0),
            created_at=data["created_at"],
            updated_at=data["updated_at"],
            spec=dict(data.get("spec") or {}),
            client=client,
        )

    @classmethod
    async def create(
        cls,
        name: str,
        *,
        port: int,
        image: str | None = None,
        snapshot: str | None = None,
        command: str | Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        runtime: str | None = None,
        cpu: float | None = None,
        memory_mb: int | None = None,
        disk_mb: int | None = None,
        network: str | None = None,
        min_instances: int | None = None,
        idle_timeout: float | None = None,
        health_path: str | None = None,
        start_timeout: float | None = None,
        client: AsyncClient | Client | None = None,
    ) -> AsyncDeployment:
        """Deploy `command` from `image` (or a memory `snapshot`, whose processes serve on)
        as `name`, served on `port`; returns once it answers its health check (`health_path`
        answering 2xx/3xx, else the port accepting), which it must within `start_timeout`
        seconds (60).

        `min_instances=0` (the default) lets it sleep after `idle_timeout` seconds (300)
        without requests, hibernated where the runtime can, else paused; the next request
        wakes it. `min_instances=1` keeps it awake. Raises `DeploymentFailed`, with its
        output, if it does not start (nothing is created then); `Conflict` (`name_taken`) if
        the name is in use on the server.
        """
        body = _body(locals())
        aio = async_client(client)
        return cls._from_dict(await aio.request("POST", "/v1/deployments", json=body), aio)

    @classmethod
    async def get(cls, name: str, *, client: AsyncClient | Client | None = None) -> AsyncDeployment:
        """Your deployment called `name` (`NotFound`, code deployment_not_found, if none)."""
        aio = async_client(client)
        return cls._from_dict(await aio.request("GET", f"/v1/deployments/{name}"), aio)

    @classmethod
    async def list(
        cls, *, client: AsyncClient | Client | None = None
    ) -> builtins.list[AsyncDeployment]:
        """Your deployments, oldest first."""
        aio = async_client(client)
        return [cls._from_dict(d, aio) for d in await aio.request("GET", "/v1/deployments")]

    async def refresh(self) -> AsyncDeployment:
        """The deployment as it is now."""
        data = await self._client.request("GET", f"/v1/deployments/{self.name}")
        return self._from_dict(data, self._client)

    async def update(
        self,
        *,
        port: int | None = None,
        image: str | None = None,
        snapshot: str | None = None,
        command: str | Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        runtime: str | None = None,
        cpu: float | None = None,
        memory_mb: int | None = None,
        disk_mb: int | None = None,
        network: str | None = None,
        min_instances: int | None = None,
        idle_timeout: float | None = None,
        health_path: str | None = None,
        start_timeout: float | None = None,
    ) -> AsyncDeployment:
        """Deploy a new version with these changes: it starts beside the old one, takes the
        traffic once healthy, and the old one ends after answering what it was sent, so no
        request fails. If the new version does not start (`DeploymentFailed`), the old one
        serves on. Returns the deployment as it is then."""
        body = _body(locals())
        data = await self._client.request("PATCH", f"/v1/deployments/{self.name}", json=body)
        return self._from_dict(data, self._client)

    async def delete(self) -> None:
        """End the deployment: its instance, its URL and its logs."""
        await self._client.request("DELETE", f"/v1/deployments/{self.name}")

    async def events(self) -> builtins.list[dict[str, Any]]:
        """What happened to it, oldest first: `time`, `kind` (serving, crashed, start_failed,
        slept, logs_unavailable) and `message`."""
        found: builtins.list[dict[str, Any]] = await self._client.request(
            "GET", f"/v1/deployments/{self.name}/events"
        )
        return found

    async def logs(self, *, tail: int | None = None, follow: bool = False) -> AsyncIterator[str]:
        """Its output, every version's, as the server keeps it: the last `tail` lines (all by
        default); with `follow`, then what it writes as it does, until you stop iterating."""
        params: dict[str, Any] = {"follow": follow}
        if tail is not None:
            params["tail"] = tail
        path = f"/v1/deployments/{self.name}/logs"
        async with self._client.stream("GET", path, params=params) as response:
            async for text in response.aiter_text():
                yield text

    @property
    def _client(self) -> AsyncClient:
        return self.client or default_client()


def _body(given: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments a caller gave, as the API's body (None: not given)."""
    body = {k: v for k, v in given.items() if k not in ("cls", "self", "client") and v is not None}
    if "command" in body and not isinstance(body["command"], str):
        body["command"] = list(body["command"])
    if "env" in body:
        body["env"] = dict(body["env"])
    return body


class Deployment(Twin[AsyncDeployment]):
    """A deployed service, for synchronous code (see `AsyncDeployment` for details).

    Example:
        >>> app = corral.Deployment.create(
        ...     "hello", image="debian", command="python3 -m http.server 8000", port=8000
        ... )
        >>> app.url
        'http://127.0.0.1:8470/deploy/hello/'
        >>> for text in app.logs(follow=True): print(text, end="")
    """

    @property
    def id(self) -> str:
        """The deployment's id (`dp-…`)."""
        return self._async.id

    @property
    def name(self) -> str:
        """Its name, part of its URL, unique on the server."""
        return self._async.name

    @property
    def url(self) -> str:
        """Where anyone reaches it."""
        return self._async.url

    @property
    def status(self) -> str:
        """starting, running, sleeping, restarting or failing (as of when fetched)."""
        return self._async.status

    @property
    def version(self) -> int:
        """1, then one more with each update."""
        return self._async.version

    @property
    def instance(self) -> str | None:
        """The sandbox serving it (as of when fetched)."""
        return self._async.instance

    @property
    def restarts(self) -> int:
        """How often its instance was replaced after a crash (since the server started)."""
        return self._async.restarts

    @property
    def created_at(self) -> float:
        """When it was deployed first (Unix time)."""
        return self._async.created_at

    @property
    def updated_at(self) -> float:
        """When its version or instance last changed (Unix time)."""
        return self._async.updated_at

    @property
    def spec(self) -> Mapping[str, Any]:
        """What it runs: image or snapshot, command, port, resources..."""
        return self._async.spec

    def __repr__(self) -> str:
        return f"<Deployment {self.name} v{self.version} {self.status} {self.url}>"

    create = constructor(AsyncDeployment.create)
    get = constructor(AsyncDeployment.get)
    list = constructor_each(AsyncDeployment.list)
    refresh = blocking_self(AsyncDeployment.refresh)
    update = blocking_self(AsyncDeployment.update)
    delete = blocking(AsyncDeployment.delete)
    events = blocking(AsyncDeployment.events)
    logs = blocking_iter(AsyncDeployment.logs)


class AsyncDeploys(abc.ABC):
    """`AsyncSandbox.deploy`: the step from a sandbox to production."""

    client: AsyncClient

    @abc.abstractmethod
    def _path(self, suffix: str = "") -> str:
        """The sandbox's API path, with `suffix`."""

    async def deploy(
        self,
        name: str,
        *,
        port: int,
        command: str | Sequence[str],
        env: Mapping[str, str] | None = None,
        min_instances: int | None = None,
        idle_timeout: float | None = None,
        health_path: str | None = None,
        start_timeout: float | None = None,
    ) -> AsyncDeployment:
        """Promote this sandbox to a deployment called `name`: its files (what you installed
        and wrote) become an image, and `command` serves `port` from it, with this sandbox's
        runtime, resources, network and environment (plus `env`). Its running processes do
        not carry over. Returns once it is healthy (see `AsyncDeployment.create`)."""
        body = _body(locals())
        data = await self.client.request("POST", self._path("/deploy"), json=body)
        return AsyncDeployment._from_dict(data, self.client)
