"""The HTTP API's routes, one module per resource. Routes only turn HTTP into calls of the
resource services (`corral.server.resources`) and their answers back into HTTP; they never
reach into the engine or the store."""

from fastapi import APIRouter

from corral.server.routes import (
    admin,
    audit,
    code,
    code_stream,
    deployments,
    events,
    files,
    images,
    keys,
    metrics,
    moves,
    nodes,
    pools,
    ports,
    previews,
    processes,
    sandboxes,
    snapshots,
    stream,
    volumes,
    webhooks,
)

ROUTERS: tuple[APIRouter, ...] = tuple(
    module.router
    for module in (
        sandboxes,
        processes,
        code,
        code_stream,
        files,
        stream,
        ports,
        previews,
        deployments,
        snapshots,
        images,
        volumes,
        pools,
        keys,
        events,
        admin,
        nodes,
        moves,
        metrics,
        webhooks,
        audit,
    )
)
