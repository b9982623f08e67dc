"""Previews in the SDK: `sandbox.expose(port)` opens a port of a sandbox to HTTP clients and
returns an `AsyncPreview` (`Preview` for synchronous code) with its URL and token.

`AsyncSandbox` inherits `expose` and `previews` from `AsyncPreviews`; `Sandbox` has their
synchronous twins.
"""

from __future__ import annotations

import abc
import builtins
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from corral.client._client import AsyncClient
from corral.client._sync import Client, Twin, blocking


@dataclass(frozen=True)
class AsyncPreview:
    """A port of a sandbox opened to HTTP clients.

    `url` is where clients reach it. Unless it is `public`, a client sends `headers` (the
    token) with each request; a browser opens `signed_url` once, which keeps the token in a
    cookie for this preview only. `token`, `headers` and `signed_url` are known only to the
    call that made the preview (the server keeps a digest of the token).

    Example:
        >>> await sandbox.exec("python3 -m http.server 8000")
        >>> preview = await sandbox.expose(8000)
        >>> httpx.get(preview.url, headers=preview.headers).status_code
        200
    """

    id: str
    sandbox_id: str
    port: int
    public: bool
    url: str
    created_at: float
    expires_at: float | None = None
    token: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    signed_url: str | None = None
    client: AsyncClient | None = field(default=None, repr=False, compare=False)

    @classmethod
    def _from_dict(cls, data: Mapping[str, Any], client: AsyncClient) -> AsyncPreview:
        return cls(
            id=data["id"],
            sandbox_id=data["sandbox_id"],
            port=data["port"],
            public=data["public"],
            url=data["url"],
            created_at=data["created_at"],
            expires_at=data.get("expires_at"),
            token=data.get("token"),
            headers=dict(data.get("headers") or {}),
            signed_url=data.get("signed_url"),
            client=client,
        )

    async def revoke(self) -> None:
        """Close the preview: its token, and its URL if public, stop working at once."""
        assert self.client is not None
        await self.client.request("DELETE", f"/v1/sandboxes/{self.sandbox_id}/previews/{self.id}")


class Preview(Twin[AsyncPreview]):
    """A port of a sandbox opened to HTTP clients (see `AsyncPreview` for details)."""

    @property
    def id(self) -> str:
        """The preview's id (`pv-…`)."""
        return self._async.id

    @property
    def sandbox_id(self) -> str:
        return self._async.sandbox_id

    @property
    def port(self) -> int:
        return self._async.port

    @property
    def public(self) -> bool:
        """Whether anyone with the URL gets in, without a token."""
        return self._async.public

    @property
    def url(self) -> str:
        """Where clients reach the port."""
        return self._async.url

    @property
    def created_at(self) -> float:
        """When it was opened (Unix time)."""
        return self._async.created_at

    @property
    def expires_at(self) -> float | None:
        """When it stops working (Unix time), if it expires."""
        return self._async.expires_at

    @property
    def token(self) -> str | None:
        """The token that opens it (only from the call that made it)."""
        return self._async.token

    @property
    def headers(self) -> Mapping[str, str]:
        """What a client sends with each request to be let in."""
        return self._async.headers

    @property
    def signed_url(self) -> str | None:
        """The URL with the token, for a browser: it is kept in a cookie after the first visit."""
        return self._async.signed_url

    def __repr__(self) -> str:
        return f"<Preview {self.id} port {self.port} {self.url}>"

    revoke = blocking(AsyncPreview.revoke)


def previews_of(client: Client, found: builtins.list[AsyncPreview]) -> builtins.list[Preview]:
    return [Preview(client, preview) for preview in found]


class AsyncPreviews(abc.ABC):
    """The preview methods of `AsyncSandbox`."""

    client: AsyncClient

    @abc.abstractmethod
    def _path(self, suffix: str = "") -> str:
        """The sandbox's API path, with `suffix`."""

    async def expose(
        self, port: int, *, public: bool = False, ttl: float | None = None
    ) -> AsyncPreview:
        """Open `port` to HTTP clients: a URL (by path on the server, or by host name where it
        has a preview domain) and a token that grants this port of this sandbox only.

        `public` lets anyone with the URL in; `ttl` (seconds) makes it expire. Requests reach
        the server through Corral (no network between them is needed, so also for sandboxes
        without network); a request to a paused or hibernated sandbox wakes it. HTTP/1.1
        with streaming both ways and Server-Sent Events.
        """
        body = {"port": port, "public": public, "ttl": ttl}
        data = await self.client.request("POST", self._path("/previews"), json=body)
        return AsyncPreview._from_dict(data, self.client)

    async def previews(self) -> builtins.list[AsyncPreview]:
        """The sandbox's previews that are neither revoked nor expired (without tokens)."""
        found = await self.client.request("GET", self._path("/previews"))
        return [AsyncPreview._from_dict(data, self.client) for data in found]
