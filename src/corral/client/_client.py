"""The connection to a Corral server: URL, API key, HTTP and WebSocket transport, errors.

The async client is the source of truth; `corral.Client` (sync) drives it from a background
event loop. Every error the server sends comes back as the matching `CorralError` subclass,
with the server's code and message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import weakref
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Mapping
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidURI

from corral.errors import AuthError, ConnectionFailed, CorralError, from_response
from corral.models import BuiltImage
from corral.snapshots import SnapshotInfo

DEFAULT_URL = "http://127.0.0.1:8470"


class AsyncClient:
    """A connection to one Corral server, configured by arguments or the environment.

    `url` defaults to `$CORRAL_URL` (else http://127.0.0.1:8470), `api_key` to
    `$CORRAL_API_KEY`.

    Example:
        >>> async with corral.AsyncClient(url="http://127.0.0.1:8470", api_key=key) as client:
        ...     sandbox = await corral.AsyncSandbox.create(client=client)
    """

    def __init__(
        self, url: str | None = None, api_key: str | None = None, *, timeout: float = 300.0
    ) -> None:
        self.url = (url or os.environ.get("CORRAL_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key or os.environ.get("CORRAL_API_KEY") or None
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=10.0),
        )
        self._sockets: weakref.WeakSet[ClientConnection] = weakref.WeakSet()

    async def aclose(self) -> None:
        """Close the client's connections (exec streams still open are hung up)."""
        for ws in list(self._sockets):
            await ws.close()
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _check_key(self) -> None:
        if not self.api_key:
            raise AuthError(
                "no API key: set CORRAL_API_KEY or pass api_key= (corral serve prints one)"
            )

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | list[tuple[str, Any]] | None = None,
        content: bytes | AsyncIterable[bytes] | None = None,
    ) -> Any:
        """Send one request; return the decoded JSON answer (None for an empty one)."""
        self._check_key()
        try:
            response = await self._http.request(
                method, path, json=json, params=params, content=content
            )
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if response.status_code >= 400:
            raise _error(response.status_code, response.content, response.headers)
        return response.json() if response.content else None

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
    ) -> AsyncIterator[httpx.Response]:
        """A request whose answer streams; its errors are raised before any content is read."""
        self._check_key()
        try:
            async with self._http.stream(
                method, path, params=params, json=json, timeout=httpx.Timeout(None, connect=10.0)
            ) as response:
                if response.status_code >= 400:
                    raise _error(response.status_code, await response.aread(), response.headers)
                yield response
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    def download(
        self, path: str, params: Mapping[str, Any]
    ) -> contextlib.AbstractAsyncContextManager[httpx.Response]:
        """A streamed GET (see `stream`)."""
        return self.stream("GET", path, params=params)

    async def has_blob(self, digest: str) -> bool:
        """Whether the server holds this uploaded content already."""
        self._check_key()
        try:
            response = await self._http.head(f"/v1/blobs/{digest}")
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if response.status_code not in (200, 404):
            raise _error(response.status_code, b"", response.headers)
        return response.status_code == 200

    async def events(self, sandbox_id: str | None = None) -> AsyncGenerator[dict[str, Any], None]:
        """State changes of your sandboxes (or of one) as they happen, from `GET /v1/events`:
        `{"type": "sandbox.state", "sandbox_id", "state", "reason", "at", "end_reason", ...}`.
        Runs until you stop iterating."""
        params = {"sandbox_id": sandbox_id} if sandbox_id else None
        async with self.stream("GET", "/v1/events", params=params) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    yield json.loads(line.removeprefix("data: "))

    async def list_snapshots(self) -> list[SnapshotInfo]:
        """Your snapshots, oldest first."""
        return [SnapshotInfo(**s) for s in await self.request("GET", "/v1/snapshots")]

    async def get_snapshot(self, ref: str) -> SnapshotInfo:
        """One of your snapshots by id or name."""
        return SnapshotInfo(**await self.request("GET", f"/v1/snapshots/{ref}"))

    async def delete_snapshot(self, ref: str) -> None:
        """Delete a snapshot; sandboxes started from it go on."""
        await self.request("DELETE", f"/v1/snapshots/{ref}")

    async def list_images(self) -> list[BuiltImage]:
        """Your built images, oldest first."""
        return [BuiltImage.from_dict(i) for i in await self.request("GET", "/v1/images")]

    async def get_image(self, ref: str) -> BuiltImage:
        """One of your images by id or name (`ImageNotFound` if none)."""
        return BuiltImage.from_dict(await self.request("GET", f"/v1/images/{ref}"))

    async def remove_image(self, ref: str) -> None:
        """Forget one of your images; `prune_images` frees its layers."""
        await self.request("DELETE", f"/v1/images/{ref}")

    async def prune_images(self) -> dict[str, int]:
        """Free layers and uploads no image and no sandbox uses (admin key); what was freed."""
        pruned: dict[str, int] = await self.request("POST", "/v1/images/prune")
        return pruned

    async def image_usage(self) -> dict[str, int]:
        """Bytes on the server's disk: all layers, pending uploads."""
        usage: dict[str, int] = await self.request("GET", "/v1/images/usage")
        return usage

    async def websocket(self, path: str) -> ClientConnection:
        """Open a WebSocket to `path` with this client's key."""
        self._check_key()
        url = "ws" + self.url.removeprefix("http") + path
        try:
            ws = await connect(
                url,
                additional_headers={"Authorization": f"Bearer {self.api_key}"},
                max_size=None,  # the agent's chunks are bounded; frames are never huge
                open_timeout=10,
            )
        except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
            raise self._unreachable(exc) from exc
        self._sockets.add(ws)
        return ws

    async def list_pools(self) -> list[dict[str, Any]]:
        """The server's warm pools: template, target size, idle, hits, misses."""
        pools: list[dict[str, Any]] = await self.request("GET", "/v1/pools")
        return pools

    async def set_pool(self, name: str, size: int, **template: Any) -> dict[str, Any]:
        """Create or resize pool `name` (admin key): `template` as in `AsyncSandbox.create`."""
        pool: dict[str, Any] = await self.request(
            "PUT", f"/v1/pools/{name}", json={**template, "size": size}
        )
        return pool

    async def remove_pool(self, name: str) -> None:
        """Remove a pool and end its idle sandboxes (admin key)."""
        await self.request("DELETE", f"/v1/pools/{name}")

    def _unreachable(self, exc: Exception) -> CorralError:
        return ConnectionFailed(
            f"cannot reach the Corral server at {self.url} ({type(exc).__name__}: {exc}); "
            "is `corral serve` running, and is CORRAL_URL right?"
        )


def _error(status: int, body: bytes, headers: Mapping[str, str]) -> CorralError:
    try:
        error = json.loads(body)["error"]
        made = from_response(status, str(error["code"]), str(error["message"]))
    except (ValueError, KeyError, TypeError):
        text = body.decode(errors="replace")[:500]
        made = from_response(status, "http_error", f"HTTP {status}: {text}")
    retry_after = headers.get("retry-after", "")
    if retry_after.isdigit():
        made.retry_after = int(retry_after)
    return made


# One default client per event loop: an httpx client cannot move between loops.
_defaults: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncClient] = (
    weakref.WeakKeyDictionary()
)


def default_client() -> AsyncClient:
    """The client for this event loop, configured from the environment."""
    loop = asyncio.get_running_loop()
    client = _defaults.get(loop)
    if client is None:
        client = _defaults[loop] = AsyncClient()
    return client
