"""Who is calling: every request carries `Authorization: Bearer <API key>`."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, WebSocket
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from corral.errors import AuthError, PermissionDenied
from corral.server.service import Service
from corral.store import ApiKey

bearer = HTTPBearer(auto_error=False, description="an API key from `corral keys create`")


def service_of(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


async def check_key(service: Service, header: str | None) -> ApiKey:
    """The key in an `Authorization` header value, or `AuthError` saying what is wrong."""
    if not header:
        raise AuthError(
            "send your API key as 'Authorization: Bearer <key>' "
            "(corral serve prints one; corral keys create makes more)"
        )
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise AuthError("the Authorization header must read 'Bearer <key>'")
    key = await service.db.authenticate(secret.strip())
    if key is None:
        raise AuthError("this API key is unknown or revoked")
    return key


async def current_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> ApiKey:
    return await check_key(service_of(request), request.headers.get("authorization"))


async def admin_key(key: Annotated[ApiKey, Depends(current_key)]) -> ApiKey:
    if not key.admin:
        raise PermissionDenied(
            "only an admin key can do this (manage keys, pools, prune images); "
            "corral keys create --admin makes one",
            code="admin_required",
        )
    return key


async def websocket_key(websocket: WebSocket) -> ApiKey:
    service: Service = websocket.app.state.service
    return await check_key(service, websocket.headers.get("authorization"))


Key = Annotated[ApiKey, Depends(current_key)]
AdminKey = Annotated[ApiKey, Depends(admin_key)]
ServiceDep = Annotated[Service, Depends(service_of)]
