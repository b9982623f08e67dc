"""HTTP routes for previews: open a port of a sandbox to HTTP clients, list and revoke them.
(The previews themselves are served by `corral.server.previews.gateway`.)"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from corral.server.auth import Me
from corral.server.previews.gateway import HEADER, QUERY
from corral.server.previews.store import PreviewEntry
from corral.server.resources.previews import Previews

router = APIRouter(prefix="/v1/sandboxes/{sandbox_id}/previews", tags=["previews"])


async def _previews(tenant: Me) -> Previews:
    return Previews(tenant)


PreviewsDep = Annotated[Previews, Depends(_previews)]


class Expose(BaseModel):
    model_config = ConfigDict(extra="forbid")

    port: int = Field(description="The port a server listens on inside the sandbox (1-65535).")
    public: bool = Field(default=False, description="Anyone with the URL, no token needed.")
    ttl: float | None = Field(default=None, description="Seconds until it expires (≤ 30 days).")


class PreviewOut(BaseModel):
    id: str
    sandbox_id: str
    port: int
    public: bool
    url: str
    created_at: float
    expires_at: float | None
    token: str | None = Field(default=None, description="Only when created: keep it.")
    headers: dict[str, str] | None = Field(
        default=None, description="What a client sends to be let in (only when created)."
    )
    signed_url: str | None = Field(
        default=None, description="The URL with the token, for a browser (only when created)."
    )

    @classmethod
    def of(cls, entry: PreviewEntry, request: Request, token: str | None = None) -> PreviewOut:
        url = preview_url(request, entry)
        return cls(
            id=entry.id,
            sandbox_id=entry.sandbox_id,
            port=entry.port,
            public=entry.public,
            url=url,
            created_at=entry.created_at,
            expires_at=entry.expires_at,
            token=token,
            headers={HEADER.decode().title(): token} if token else None,
            signed_url=f"{url}?{QUERY}={token}" if token else None,
        )


def preview_url(request: Request, entry: PreviewEntry) -> str:
    """Where clients reach the preview: by host name with a preview domain, else by path."""
    domain = request.app.state.service.config.preview_domain
    if domain:
        return f"{request.url.scheme}://{entry.port}-{entry.sandbox_id}.{domain}/"
    return f"{str(request.base_url).rstrip('/')}/preview/{entry.sandbox_id}/{entry.port}/"


@router.post("", status_code=201)
async def expose(
    sandbox_id: str, body: Expose, request: Request, previews: PreviewsDep
) -> PreviewOut:
    """Open a port of the sandbox to HTTP clients: its URL, and the token that opens it (a
    header, or once in the URL for a browser, which then keeps it in a cookie)."""
    entry, token = await previews.create(sandbox_id, body.port, public=body.public, ttl=body.ttl)
    return PreviewOut.of(entry, request, token)


@router.get("")
async def list_previews(
    sandbox_id: str, request: Request, previews: PreviewsDep
) -> list[PreviewOut]:
    """The sandbox's previews that are neither revoked nor expired (without their tokens)."""
    return [PreviewOut.of(entry, request) for entry in await previews.list(sandbox_id)]


@router.delete("/{preview_id}", status_code=204)
async def revoke(sandbox_id: str, preview_id: str, previews: PreviewsDep) -> Response:
    """Revoke a preview: its token, and its URL if public, stop working at once."""
    await previews.revoke(sandbox_id, preview_id)
    return Response(status_code=204)
