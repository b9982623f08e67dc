"""The connection to a Corral server: URL, API key, HTTP and WebSocket transport, errors.

The async client is the source of truth; `corral.Client` (sync) drives it from a background
event loop. Every error the server sends comes back as the matching `CorralError` subclass,
with the server's code and message.
"""

from __future__ import annotations

import contextlib
import json
import os
import weakref
from collections.abc import AsyncGenerator, AsyncIterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from corral.core.audit import AuditEntry, ReplayReport, ReplayStep
from corral.core.errors import AuthError
from corral.core.models import BuiltImage, NodeInfo, SandboxInfo, SnapshotInfo, UsageSample

if TYPE_CHECKING:
    import asyncio

    import httpx

    from corral.client._transport import Socket, Transport

DEFAULT_URL = "http://127.0.0.1:8470"


class AsyncClient:
    """A connection to one Corral server, configured by arguments or the environment.

    `url` defaults to `$CORRAL_URL` (else http://127.0.0.1:8470), `api_key` to
    `$CORRAL_API_KEY`. An `https` server's certificate is checked against the CA file `ca`
    (default `$CORRAL_CA`, the path `corral serve --tls auto` prints), else the system's CAs;
    `verify=False` (or `CORRAL_TLS_VERIFY=0`) skips the check, which lets anyone in between
    read your key.

    Example:
        >>> async with corral.AsyncClient(url="http://127.0.0.1:8470", api_key=key) as client:
        ...     sandbox = await corral.AsyncSandbox.create(client=client)
    """

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 300.0,
        ca: str | None = None,
        verify: bool | None = None,
    ) -> None:
        self.url = (url or os.environ.get("CORRAL_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key or os.environ.get("CORRAL_API_KEY") or None
        self._timeout = timeout
        self._ca = ca or os.environ.get("CORRAL_CA") or None
        if verify is None:
            verify = os.environ.get("CORRAL_TLS_VERIFY", "1").lower() not in ("0", "false", "no")
        self._verify = verify
        self._app: Any = None  # see `_in_process`
        self._transport: Transport | None = None  # made on first use (see _transport.py)

    @classmethod
    def _in_process(cls, app: Any, api_key: str) -> AsyncClient:
        """A client of the Corral ASGI application `app` running in this process, with
        `api_key`: what a server uses to call its own API as one of its keys."""
        client = cls(url="http://corral.invalid", api_key=api_key)
        client._app = app
        return client

    @property
    def _wire(self) -> Transport:
        if self._transport is None:
            if not self.api_key:
                raise AuthError(
                    "no API key: set CORRAL_API_KEY or pass api_key= (corral serve prints one)"
                )
            from corral.client._transport import Transport

            self._transport = Transport(
                self.url,
                self.api_key,
                self._timeout,
                ca=self._ca,
                verify=self._verify,
                app=self._app,
            )
        return self._transport

    async def aclose(self) -> None:
        """Close the client's connections (exec streams still open are hung up)."""
        if self._transport is not None:
            await self._transport.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

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
        return await self._wire.request(method, path, json=json, params=params, content=content)

    def stream(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
    ) -> contextlib.AbstractAsyncContextManager[httpx.Response]:
        """A request whose answer streams; its errors are raised before any content is read."""
        return self._wire.stream(method, path, params=params, json=json)

    def download(
        self, path: str, params: Mapping[str, Any]
    ) -> contextlib.AbstractAsyncContextManager[httpx.Response]:
        """A streamed GET (see `stream`)."""
        return self.stream("GET", path, params=params)

    async def has_blob(self, digest: str) -> bool:
        """Whether the server holds this uploaded content already."""
        return await self._wire.exists(f"/v1/blobs/{digest}")

    async def websocket(self, path: str) -> Socket:
        """Open a WebSocket to `path` with this client's key."""
        return await self._wire.websocket(path)

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

    async def sandbox_usage(self) -> list[dict[str, Any]]:
        """Each of your live sandboxes, `{sandbox_id, state, runtime, metadata, sample}`, with
        its newest `UsageSample` (None until the first): what `corral top` shows."""
        rows: list[dict[str, Any]] = await self.request("GET", "/v1/metrics/sandboxes")
        for row in rows:
            row["sample"] = None if row["sample"] is None else UsageSample.from_dict(row["sample"])
        return rows

    async def create_webhook(self, url: str, events: list[str] | None = None) -> dict[str, Any]:
        """POST your sandboxes' events (`sandbox.state`, `sandbox.egress_denied`; default both)
        to `url`, signed: the answer's `secret` (given once) checks `Corral-Signature`."""
        body = {"url": url, "events": events}
        hook: dict[str, Any] = await self.request("POST", "/v1/webhooks", json=body)
        return hook

    async def list_webhooks(self) -> list[dict[str, Any]]:
        """Your webhooks: `{id, url, events, created_at}` (never their secrets)."""
        hooks: list[dict[str, Any]] = await self.request("GET", "/v1/webhooks")
        return hooks

    async def delete_webhook(self, webhook_id: str) -> None:
        """Stop sending events to a webhook."""
        await self.request("DELETE", f"/v1/webhooks/{webhook_id}")

    async def audit(
        self,
        *,
        sandbox: str | None = None,
        key: str | None = None,
        operation: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
        newest_first: bool = False,
    ) -> list[AuditEntry]:
        """Audit log entries matching every filter given, up to `limit` (fetched a page at a
        time): yours, or every key's with an admin key (`key` picks one)."""
        params: dict[str, Any] = {"sandbox": sandbox, "key": key, "operation": operation,
                                  "since": since, "until": until,
                                  "order": "desc" if newest_first else "asc"}  # fmt: skip
        params = {name: value for name, value in params.items() if value is not None}
        entries: list[AuditEntry] = []
        while len(entries) < limit:
            params["limit"] = min(limit - len(entries), 1000)
            page = await self.request("GET", "/v1/audit", params=params)
            entries += [AuditEntry.from_dict(entry) for entry in page["entries"]]
            if page["next"] is None:
                break
            params["cursor"] = page["next"]
        return entries

    async def audit_replay(
        self, sandbox_id: str, snapshot: str, *, keep: bool = False
    ) -> ReplayReport:
        """Run `sandbox_id`'s recorded commands and code again, in order, in a new sandbox from
        `snapshot` (yours, by id or name), comparing each outcome with the recorded one; the
        new sandbox ends afterwards unless `keep`."""
        body = {"sandbox_id": sandbox_id, "snapshot": snapshot, "keep": keep}
        steps: list[ReplayStep] = []
        fork_id = ""
        async with self.stream("POST", "/v1/audit/replay", json=body) as response:
            async for line in response.aiter_lines():
                if not line:
                    continue
                event = json.loads(line)
                kind = event.pop("type")
                if kind == "started":
                    fork_id = event["fork_id"]
                elif kind == "step":
                    steps.append(ReplayStep.from_dict(event))
        return ReplayReport(sandbox_id=sandbox_id, snapshot=snapshot, fork_id=fork_id, steps=steps)

    async def list_pools(self) -> list[dict[str, Any]]:
        """The server's warm pools: template, target size, idle, hits, misses."""
        pools: list[dict[str, Any]] = await self.request("GET", "/v1/pools")
        return pools

    async def set_pool(self, /, name: str, size: int, **template: Any) -> dict[str, Any]:
        """Create or resize pool `name` (admin key): `template` as in `AsyncSandbox.create`."""
        pool: dict[str, Any] = await self.request(
            "PUT", f"/v1/pools/{name}", json={**template, "size": size}
        )
        return pool

    async def list_all_sandboxes(self) -> list[tuple[str, SandboxInfo]]:
        """Every live sandbox of every key, with the id of the key that owns it (admin key)."""
        listed = await self.request("GET", "/v1/admin/sandboxes")
        return [(item["owner"], SandboxInfo.from_dict(item["sandbox"])) for item in listed]

    async def end_sandbox(self, sandbox_id: str) -> SandboxInfo:
        """End any live sandbox, whoever owns it (admin key; `terminated_by_admin`)."""
        ended = await self.request("DELETE", f"/v1/admin/sandboxes/{sandbox_id}")
        return SandboxInfo.from_dict(ended)

    async def nodes(self) -> list[NodeInfo]:
        """The machines whose engines run sandboxes: runtimes, capacity, what their sandboxes
        ask for, load and pools (admin key)."""
        listed = await self.request("GET", "/v1/nodes")
        return [NodeInfo.from_dict(node) for node in listed]

    async def drain_node(self, name: str, draining: bool = True) -> NodeInfo:
        """Place no new sandboxes on a cluster's node (`draining=False`: place there again);
        its sandboxes run on and are reached as ever (admin key)."""
        entry = await self.request("POST" if draining else "DELETE", f"/v1/nodes/{name}/drain")
        return NodeInfo.from_dict(entry)

    async def remove_pool(self, name: str) -> None:
        """Remove a pool and end its idle sandboxes (admin key)."""
        await self.request("DELETE", f"/v1/pools/{name}")


# One default client per event loop: an httpx client cannot move between loops.
_defaults: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncClient] = (
    weakref.WeakKeyDictionary()
)


def default_client() -> AsyncClient:
    """The client for this event loop, configured from the environment."""
    import asyncio

    loop = asyncio.get_running_loop()
    client = _defaults.get(loop)
    if client is None:
        client = _defaults[loop] = AsyncClient()
    return client
