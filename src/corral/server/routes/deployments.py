"""HTTP routes for deployments: long-running services with a stable URL, light sleep, logs and
updates without downtime. (Their traffic is served by `corral.server.previews.gateway`.)"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from corral.server.auth import Me
from corral.server.deployments.runner import Runner
from corral.server.deployments.spec import DEFAULT_IDLE_TIMEOUT, DeploymentSpec
from corral.server.resources.deployments import Deployments

router = APIRouter(tags=["deployments"])
MAX_TAIL = 100_000


async def _deployments(tenant: Me, request: Request) -> Deployments:
    return Deployments(tenant, request.app.state.deployments)


DeploymentsDep = Annotated[Deployments, Depends(_deployments)]


class Version(BaseModel):
    """What a deployment runs (every field may change in an update, but its name)."""

    model_config = ConfigDict(extra="forbid")

    port: int | None = Field(default=None, description="The port its server listens on.")
    image: str | None = Field(default=None, description="An image to run (name or id).")
    snapshot: str | None = Field(default=None, description="Or a memory snapshot to restore.")
    command: list[str] | str | None = Field(
        default=None, description="What serves the port (a string runs in /bin/sh)."
    )
    env: dict[str, str] | None = None
    runtime: str | None = None
    cpu: float | None = None
    memory_mb: int | None = None
    disk_mb: int | None = None
    network: str | None = Field(default=None, description="'none' (default) or 'internet'.")
    min_instances: int | None = Field(default=None, description="0: sleeps when idle; 1: never.")
    idle_timeout: float | None = Field(
        default=None,
        description=f"Seconds without requests before it sleeps ({DEFAULT_IDLE_TIMEOUT:g}).",
    )
    health_path: str | None = Field(
        default=None, description="Healthy once it answers 2xx/3xx (default: the port accepts)."
    )
    start_timeout: float | None = Field(
        default=None, description="Seconds a new instance has to become healthy (60, ≤ 600)."
    )


class Deploy(Version):
    name: str = Field(description="Its URL's name: lowercase letters, digits and '-'.")


class FromSandbox(Version):
    name: str
    port: int | None = None
    command: list[str] | str | None = Field(
        default=None,
        description="What serves the port (the sandbox's processes do not carry over).",
    )


class DeploymentOut(BaseModel):
    id: str
    name: str
    url: str
    status: str = Field(description="starting, running, sleeping, restarting or failing.")
    version: int
    instance: str | None = Field(description="The sandbox serving it now.")
    restarts: int
    created_at: float
    updated_at: float
    spec: dict[str, Any]

    @classmethod
    def of(cls, runner: Runner, request: Request) -> DeploymentOut:
        entry = runner.entry
        return cls(
            id=entry.id,
            name=entry.name,
            url=deployment_url(request, entry.name),
            status=runner.status,
            version=entry.version,
            instance=runner.instance.sandbox_id if runner.instance else None,
            restarts=runner.restarts,
            created_at=entry.created_at,
            updated_at=entry.updated_at,
            spec={k: v for k, v in entry.spec.to_dict().items() if k != "name"},
        )


def deployment_url(request: Request, name: str) -> str:
    """Where clients reach it: by host name with a preview domain, else by path."""
    domain = request.app.state.service.config.preview_domain
    if domain:
        return f"{request.url.scheme}://{name}.{domain}/"
    return f"{str(request.base_url).rstrip('/')}/deploy/{name}/"


def _given(body: BaseModel) -> dict[str, Any]:
    return {k: v for k, v in body.model_dump(exclude_unset=True).items() if v is not None}


@router.post("/v1/deployments", status_code=201)
async def create(body: Deploy, request: Request, deployments: DeploymentsDep) -> DeploymentOut:
    """Deploy an image (or snapshot) and command as a service with a stable URL. Returns once
    it answers its health check; if it does not, nothing is created and the error ends with
    its output (422 deployment_failed)."""
    spec = DeploymentSpec.from_dict(_given(body) | {"port": body.port})
    return DeploymentOut.of(await deployments.create(spec), request)


@router.post("/v1/sandboxes/{sandbox_id}/deploy", status_code=201)
async def deploy_sandbox(
    sandbox_id: str, body: FromSandbox, request: Request, deployments: DeploymentsDep
) -> DeploymentOut:
    """Promote a sandbox to a deployment: its files become an image that `command` serves,
    with the sandbox's runtime, resources, network and environment unless given."""
    runner = await deployments.from_sandbox(sandbox_id, _given(body) | {"port": body.port})
    return DeploymentOut.of(runner, request)


@router.get("/v1/deployments")
async def list_deployments(request: Request, deployments: DeploymentsDep) -> list[DeploymentOut]:
    """Your deployments."""
    return [DeploymentOut.of(runner, request) for runner in deployments.list()]


@router.get("/v1/deployments/{name}")
async def get(name: str, request: Request, deployments: DeploymentsDep) -> DeploymentOut:
    return DeploymentOut.of(deployments.get(name), request)


@router.patch("/v1/deployments/{name}")
async def update(
    name: str, body: Version, request: Request, deployments: DeploymentsDep
) -> DeploymentOut:
    """A new version: started, health-checked, then given the traffic; the old instance ends
    once its requests are answered. If the new one fails (422), the old one serves on."""
    return DeploymentOut.of(await deployments.update(name, _given(body)), request)


@router.delete("/v1/deployments/{name}", status_code=204)
async def delete(name: str, deployments: DeploymentsDep) -> Response:
    """End the deployment, its instance and its logs; its name is free again."""
    await deployments.delete(name)
    return Response(status_code=204)


@router.get("/v1/deployments/{name}/events")
async def events(name: str, deployments: DeploymentsDep) -> list[dict[str, Any]]:
    """What happened to it, oldest first: serving, crashed, start_failed, slept..."""
    return deployments.get(name).book.events


@router.get("/v1/deployments/{name}/logs", response_class=StreamingResponse)
async def logs(
    name: str,
    deployments: DeploymentsDep,
    tail: Annotated[int | None, Query(ge=0, le=MAX_TAIL)] = None,
    follow: bool = False,
) -> StreamingResponse:
    """Its output (every version's, kept on the server): the last `tail` lines, or all kept;
    with `follow`, then what it writes, as it does, until the client hangs up."""
    book = deployments.get(name).book

    async def chunks() -> AsyncIterator[bytes]:
        if not follow:
            yield book.tail(tail)
            return
        async for data in book.follow(tail):
            yield data

    return StreamingResponse(chunks(), media_type="text/plain; charset=utf-8")
