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

from fastapi import FastAPI
from starlette.types import Scope

from corral.runtimes import PREFERENCE
from corral.server import errors, files, images, routes, stream, volumes
from corral.server.auth import ServiceDep
from corral.server.schemas import ErrorOut, Health
from corral.server.service import ServerConfig, Service


def _is_upload(scope: Scope) -> bool:
    path = str(scope.get("path", ""))
    return scope.get("method") == "PUT" and (
        path.endswith("/files/content") or path.startswith("/v1/blobs/")
    )


def create_app(config: ServerConfig) -> FastAPI:
    """The ASGI application; the engine starts (and re-adopts sandboxes) in its lifespan."""
    service = Service(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.close()

    app = FastAPI(
        title="Corral",
        version=version("corral"),
        summary="Secure sandboxes for AI agents: create, run commands, move files.",
        lifespan=lifespan,
        responses={code: {"model": ErrorOut} for code in (400, 401, 404, 409, 413, 422, 429)},
    )
    app.state.service = service
    errors.install(app)
    app.add_middleware(errors.BodyLimit, limit=config.max_body_bytes, unlimited=_is_upload)
    app.include_router(routes.router)
    app.include_router(files.router)
    app.include_router(stream.router)
    app.include_router(images.router)
    app.include_router(volumes.router)

    @app.get("/healthz", tags=["server"])
    async def healthz(service: ServiceDep) -> Health:
        """Liveness, with which runtimes this machine can run (no key needed)."""
        return Health(
            status="ok",
            version=version("corral"),
            runtimes={name: service.engine.unavailable_reason(name) for name in PREFERENCE},
        )

    return app
