"""Who is calling: every request carries `Authorization: Bearer <API key>`, which becomes the
`Tenant` every resource service is made for (FastAPI dependencies)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, WebSocket
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from corral.core.errors import AuthError, PermissionDenied
from corral.server import audit
from corral.server.logs import KEY_ID
from corral.server.resources.admin import AllSandboxes, Keys, Nodes, Pools
from corral.server.resources.audit import AuditTrail
from corral.server.resources.images import ImageArchives, Images
from corral.server.resources.moves import SandboxMoves
from corral.server.resources.sandboxes import Sandboxes
from corral.server.resources.snapshots import SnapshotArchives, Snapshots
from corral.server.resources.volumes import Volumes
from corral.server.resources.webhooks import TenantWebhooks
from corral.server.service import Service
from corral.server.tenancy import Tenant

bearer = HTTPBearer(auto_error=False, description="an API key from `corral keys create`")


async def tenant_of(service: Service, header: str | None, address: str) -> Tenant:
    """The tenant whose key is in an `Authorization` header value, or `AuthError` saying what
    is wrong; an `address` that failed too often lately is refused first (`FailedLogins`)."""
    service.failed_logins.check(address)
    try:
        return await _authenticate(service, header)
    except AuthError:
        service.failed_logins.failed(address)
        raise


async def _authenticate(service: Service, header: str | None) -> Tenant:
    if not header:
        raise AuthError(
            "send your API key as 'Authorization: Bearer <key>' "
            "(corral serve prints one; corral keys create makes more)"
        )
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise AuthError("the Authorization header must read 'Bearer <key>'")
    key = await service.store.authenticate(secret.strip())
    if key is None:
        raise AuthError("this API key is unknown or revoked")
    KEY_ID.set(key.id)  # for the request's log lines
    audit.identify(key.id)
    return Tenant(service, key)


def service_of(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


async def current_tenant(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Tenant:
    address = request.client.host if request.client else "unknown"
    return await tenant_of(service_of(request), request.headers.get("authorization"), address)


async def admin_tenant(tenant: Annotated[Tenant, Depends(current_tenant)]) -> Tenant:
    if not tenant.key.admin:
        raise PermissionDenied(
            "only an admin key can do this (manage keys, pools, prune images); "
            "corral keys create --admin makes one",
            code="admin_required",
        )
    return tenant


# A browser cannot set headers on a WebSocket (the console's terminal): it offers the key as a
# subprotocol, `corral.key.<key>`, beside `corral`, the one the server then accepts with.
KEY_PROTOCOL = "corral.key."
PROTOCOL = "corral"


def websocket_authorization(websocket: WebSocket) -> str | None:
    """The `Authorization` header, else one made from a key offered as a subprotocol."""
    header = websocket.headers.get("authorization")
    if header is not None:
        return header
    for offered in websocket.scope.get("subprotocols", ()):
        if offered.startswith(KEY_PROTOCOL):
            return "Bearer " + str(offered).removeprefix(KEY_PROTOCOL)
    return None


def websocket_protocol(websocket: WebSocket) -> str | None:
    """The subprotocol to accept with: `corral` if offered (a browser refuses a socket that
    answers none of those it offered), else none."""
    return PROTOCOL if PROTOCOL in websocket.scope.get("subprotocols", ()) else None


async def websocket_tenant(websocket: WebSocket) -> Tenant:
    service: Service = websocket.app.state.service
    address = websocket.client.host if websocket.client else "unknown"
    return await tenant_of(service, websocket_authorization(websocket), address)


Me = Annotated[Tenant, Depends(current_tenant)]
Admin = Annotated[Tenant, Depends(admin_tenant)]


# Each resource service, made for the calling tenant (or, for the admin's, an admin tenant).
# Coroutines, though they never wait: FastAPI runs a plain function's dependency on a worker
# thread, a hop that cost each request about 0.1 ms.
async def _sandboxes(tenant: Me) -> Sandboxes:
    return Sandboxes(tenant)


async def _snapshots(tenant: Me) -> Snapshots:
    return Snapshots(tenant)


async def _images(tenant: Me) -> Images:
    return Images(tenant)


async def _volumes(tenant: Me) -> Volumes:
    return Volumes(tenant)


async def _pools(tenant: Me) -> Pools:
    return Pools(tenant)


async def _admin_images(tenant: Admin) -> Images:
    return Images(tenant)


async def _admin_pools(tenant: Admin) -> Pools:
    return Pools(tenant)


async def _keys(tenant: Admin) -> Keys:
    return Keys(tenant)


async def _all_sandboxes(tenant: Admin) -> AllSandboxes:
    return AllSandboxes(tenant)


async def _nodes(tenant: Admin) -> Nodes:
    return Nodes(tenant)


def _front_only(tenant: Tenant, instead: str) -> None:
    """Refuse every key but a cluster's front's: what it moves between nodes holds sandboxes'
    memory, which no other key, an admin's included, may read."""
    if tenant.service.config.front_key_id is None or not tenant.key.front:
        raise PermissionDenied(
            f"only a cluster's front moves memory between nodes; {instead}",
            code="cluster_front_only",
        )


async def _snapshot_archives(tenant: Admin) -> SnapshotArchives:
    _front_only(tenant, "start from a snapshot (POST /v1/sandboxes with snapshot) instead")
    return SnapshotArchives(tenant)


async def _image_archives(tenant: Admin) -> ImageArchives:
    _front_only(tenant, "build the image on the node (POST /v1/images) instead")
    return ImageArchives(tenant)


async def _moves(tenant: Admin) -> SandboxMoves:
    _front_only(tenant, "move a sandbox through the front (POST /v1/sandboxes/{id}/move)")
    return SandboxMoves(tenant)


async def _webhooks(tenant: Me) -> TenantWebhooks:
    return TenantWebhooks(tenant)


async def _audit(tenant: Me) -> AuditTrail:
    return AuditTrail(tenant)


SandboxesDep = Annotated[Sandboxes, Depends(_sandboxes)]
AuditDep = Annotated[AuditTrail, Depends(_audit)]
SnapshotsDep = Annotated[Snapshots, Depends(_snapshots)]
ImagesDep = Annotated[Images, Depends(_images)]
VolumesDep = Annotated[Volumes, Depends(_volumes)]
PoolsDep = Annotated[Pools, Depends(_pools)]
AdminImagesDep = Annotated[Images, Depends(_admin_images)]
AdminPoolsDep = Annotated[Pools, Depends(_admin_pools)]
KeysDep = Annotated[Keys, Depends(_keys)]
AllSandboxesDep = Annotated[AllSandboxes, Depends(_all_sandboxes)]
NodesDep = Annotated[Nodes, Depends(_nodes)]
SnapshotArchivesDep = Annotated[SnapshotArchives, Depends(_snapshot_archives)]
ImageArchivesDep = Annotated[ImageArchives, Depends(_image_archives)]
MovesDep = Annotated[SandboxMoves, Depends(_moves)]
WebhooksDep = Annotated[TenantWebhooks, Depends(_webhooks)]
