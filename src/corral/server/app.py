"""The HTTP API: a FastAPI application in front of one engine and one store.

    from corral.server.app import create_app
    app = create_app(ServerConfig(data_dir=Path("/var/lib/corral")))

`corral serve` runs it on uvicorn. Shutting down (SIGTERM, Ctrl-C) leaves every sandbox
running; the next start re-adopts them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version

from fastapi import FastAPI, Request
from starlette.routing import Route
from starlette.types import Scope

from corral.server import console, errors, tracing
from corral.server.audit import AuditRequests
from corral.server.auth import service_of
from corral.server.cluster.elsewhere import Elsewhere
from corral.server.config import ServerConfig
from corral.server.deployments.host import DeploymentHost
from corral.server.e2b import E2bApps, E2bGateway
from corral.server.logs import RequestContext
from corral.server.mcp_http import McpEndpoint
from corral.server.previews.gateway import PreviewGateway
from corral.server.routes import ROUTERS
from corral.server.schemas import ErrorOut, Health
from corral.server.service import Service


def _is_upload(scope: Scope) -> bool:
    path = str(scope.get("path", ""))
    return scope.get("method") == "PUT" and (
        path.endswith(("/files/content", "/archive")) or path.startswith("/v1/blobs/")
    )


def create_app(config: ServerConfig) -> FastAPI:
    """The ASGI application; the engine starts (and re-adopts sandboxes) in its lifespan."""
    service = Service(config)
    deployments = DeploymentHost(service)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tracing.start()  # only if the operator set OTEL_EXPORTER_OTLP_*ENDPOINT
        await service.start()
        await deployments.start()  # adopts their instances, which live on across restarts
        try:
            async with mcp.running():
                yield
        finally:
            await e2b.close()
            await deployments.stop()
            await service.close()
            tracing.stop()

    this_version = version("corral")  # a search of the installed packages: once, not per request
    app = FastAPI(
        title="Corral",
        version=this_version,
        summary="Secure sandboxes for AI agents: create, run commands, move files.",
        lifespan=lifespan,
        # With traces on: one span per request (ours below it), not FastAPI's per dependency,
        # endpoint and serialization, nor its OpenTelemetry metrics (Prometheus has them).
        telemetry={"operation_spans": False, "metrics": False},
        responses={code: {"model": ErrorOut} for code in (400, 401, 404, 409, 413, 422, 429)},
    )
    app.state.service = service
    app.state.deployments = deployments
    errors.install(app)
    app.add_middleware(errors.BodyLimit, limit=config.max_body_bytes, unlimited=_is_upload)
    for router in ROUTERS:
        app.include_router(router)
    app.router.routes.extend(console.routes())  # the web console, at /ui
    mcp = McpEndpoint(service, app)  # MCP over streamable HTTP, as the calling key
    app.router.routes.append(Route("/mcp", mcp, methods=["GET", "POST", "DELETE"]))
    e2b = E2bApps(service)  # E2B's SDKs, routed by their headers on the same port
    app.add_middleware(E2bGateway, control=e2b.control, envd=e2b.envd, interpreter=e2b.interpreter)
    app.add_middleware(AuditRequests, log=service.audit)  # every API action; not previews
    # Previews: ports of sandboxes, by host name or under /preview/ (see corral.server.previews)
    app.add_middleware(
        PreviewGateway, service=service, deployments=deployments, domain=config.preview_domain
    )
    if config.front_key_id is not None:  # a cluster's node: one moved away is not answered here
        app.add_middleware(Elsewhere, service=service)
    app.add_middleware(errors.EarlyAnswers)  # an error sent before the body reaches its client
    app.add_middleware(RequestContext)  # outermost: every line of a request carries its ids

    @app.get("/healthz", tags=["server"])
    async def healthz(request: Request) -> Health:
        """Liveness, with which runtimes this machine can run (no key needed)."""
        runtimes = service_of(request).runtimes()
        return Health(status="ok", version=this_version, runtimes=runtimes)

    return app
