"""Lifecycle webhooks: sandbox events POSTed to URLs a key (or the operator) registers.

A key's webhook gets the events of the key's own sandboxes; the operator's (`corral serve
--webhook URL`, secret from `CORRAL_WEBHOOK_SECRET`) gets every key's. Each delivery is a JSON
`{id, type, created, data}` signed as `Corral-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of
"<t>.<body>" under the webhook's secret>`, so the receiver can check where it came from and
refuse replays. A delivery that fails (an error, a status other than 2xx, no answer in 10 s) is
tried again after 1, 2, 4, 8 and 16 s, then dropped and logged; each webhook's events go out in
order. Nothing here ever waits on the engine, nor the engine on it: events are queued (at most
1,000 per webhook, the oldest dropped first) and sent by one task per webhook.

A key's URLs are fetched by the server, so they pass the egress check image pulls do
(`corral.images.oci.egress`): public addresses only, or hosts the operator allows by name
(`--allow-webhook-host`), checked at registration and again on every connection (no redirects
followed), so a webhook cannot reach the host's network.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from corral.core.errors import InvalidRequest, LimitReached, NotFound
from corral.core.ids import check_id, new_id
from corral.engine.sealing import KeyRing
from corral.images.oci.egress import Egress, GuardedTransport, is_public
from corral.server.tables import WebhookRow

if TYPE_CHECKING:
    from corral.server.config import ServerConfig

log = logging.getLogger("corral.webhooks")

EVENT_TYPES = ("sandbox.state", "sandbox.egress_denied")
MAX_PER_KEY = 10
QUEUED = 1000
RETRIES = (1.0, 2.0, 4.0, 8.0, 16.0)  # seconds before each further try
TIMEOUT = 10.0
OPERATOR = "operator"


@dataclass(frozen=True)
class Webhook:
    id: str
    owner: str  # a key id, or OPERATOR for every key's events
    url: str
    secret: str
    events: tuple[str, ...]
    created_at: float

    def to_dict(self) -> dict[str, Any]:
        """As the API shows it: never the secret (it is given once, at registration)."""
        return {"id": self.id, "url": self.url, "events": list(self.events),
                "created_at": self.created_at}  # fmt: skip


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The `Corral-Signature` header of `body` sent at `timestamp`."""
    signed = f"{timestamp}.".encode() + body
    return f"t={timestamp},v1={hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()}"


def check_url(url: Any, egress: Egress) -> str:
    """`url` if a key may register it: http(s), a host, no credentials, public addresses (or a
    host the operator allows by name)."""
    if not isinstance(url, str) or not 0 < len(url) <= 2048:
        raise InvalidRequest("url must be an http(s) URL of at most 2048 characters",
                             code="invalid_webhook")  # fmt: skip
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(f"url {url!r} must be an http:// or https:// URL with a host",
                             code="invalid_webhook")  # fmt: skip
    if parts.username or parts.password:
        raise InvalidRequest("put no credentials in the url: check the signature instead",
                             code="invalid_webhook")  # fmt: skip
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if egress.names(parts.hostname, port):
        return url
    try:
        found = {str(info[4][0]).split("%")[0] for info in socket.getaddrinfo(parts.hostname, None)}
    except (OSError, UnicodeError) as exc:
        raise InvalidRequest(f"the host of {url!r} does not resolve: {exc}",
                             code="invalid_webhook") from exc  # fmt: skip
    private = sorted(address for address in found if not is_public(address))
    if private:
        raise InvalidRequest(
            f"{parts.hostname} resolves to {', '.join(private)}, which is not a public address: "
            "webhooks reach public addresses only (the host's network is off limits)",
            code="invalid_webhook",
        )
    return url


def check_events(events: Any) -> tuple[str, ...]:
    if events is None:
        return EVENT_TYPES
    if not isinstance(events, list) or not events or not set(events) <= set(EVENT_TYPES):
        raise InvalidRequest(f"events must be a non-empty list of {', '.join(EVENT_TYPES)}",
                             code="invalid_webhook")  # fmt: skip
    return tuple(dict.fromkeys(events))


def operator_webhook(config: ServerConfig) -> Webhook | None:
    """The operator's webhook (`--webhook`), which gets every key's events."""
    if config.webhook_url is None or config.webhook_secret is None:
        return None
    return Webhook("whk-operator", OPERATOR, config.webhook_url, config.webhook_secret,
                   EVENT_TYPES, time.time())  # fmt: skip


class WebhookStore:
    """The `webhooks` table (secrets sealed with the node's at-rest key)."""

    def __init__(self, session: async_sessionmaker[AsyncSession], keys: KeyRing) -> None:
        self._session = session
        self._keys = keys

    async def all(self) -> list[Webhook]:
        async with self._session() as session:
            rows = await session.scalars(select(WebhookRow).order_by(WebhookRow.created_at))
            return [self._webhook(row) for row in rows]

    def _webhook(self, row: WebhookRow) -> Webhook:
        secret = self._keys.open_text(row.secret, "webhook")
        events = tuple(json.loads(row.events))
        return Webhook(row.id, row.owner, row.url, secret, events, row.created_at)

    async def add(self, hook: Webhook) -> None:
        async with self._session.begin() as session:
            session.add(WebhookRow(
                id=hook.id, owner=hook.owner, url=hook.url, created_at=hook.created_at,
                secret=self._keys.seal_text(hook.secret, "webhook"),
                events=json.dumps(list(hook.events)),
            ))  # fmt: skip

    async def remove(self, hook_id: str) -> None:
        async with self._session.begin() as session:
            await session.execute(delete(WebhookRow).where(WebhookRow.id == hook_id))


class Webhooks:
    """Every webhook of the node, and one sending task per webhook."""

    def __init__(
        self, store: WebhookStore, operator: Webhook | None = None, egress: Egress | None = None
    ) -> None:
        self._store = store
        self._operator = operator
        self._egress = egress or Egress()
        self._hooks: dict[str, Webhook] = {}
        self._queues: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self._senders: dict[str, asyncio.Task[None]] = {}
        self._guarded = httpx.Client(transport=GuardedTransport(self._egress), timeout=TIMEOUT)
        self._trusted = httpx.Client(timeout=TIMEOUT, trust_env=False)

    @classmethod
    def for_server(cls, store: WebhookStore, config: ServerConfig) -> Webhooks:
        """A server's webhooks: the keys' in `store`, and the operator's if `config` has one."""
        return cls(store, operator_webhook(config), Egress.of(config.webhook_hosts))

    async def start(self) -> None:
        for hook in [*([self._operator] if self._operator else []), *await self._store.all()]:
            self._run(hook)

    async def close(self) -> None:
        for task in self._senders.values():
            task.cancel()
        await asyncio.gather(*self._senders.values(), return_exceptions=True)
        self._guarded.close()
        self._trusted.close()

    async def sync(self) -> None:
        """Take up what other servers sharing the store (a cluster's nodes and front) added or
        removed; they do the same with this one's."""
        stored = {hook.id: hook for hook in await self._store.all()}
        for hook_id in [h for h, hook in self._hooks.items() if hook.owner != OPERATOR]:
            if hook_id not in stored:
                self._stop(hook_id)
        for hook in stored.values():
            if hook.id not in self._hooks:
                self._run(hook)

    async def of(self, owner: str) -> list[Webhook]:
        await self.sync()
        return [hook for hook in self._hooks.values() if hook.owner == owner]

    async def add(self, owner: str, url: Any, events: Any) -> tuple[Webhook, str]:
        """Register `url` for `owner`'s events; the webhook and its secret (shown once)."""
        url = await asyncio.to_thread(check_url, url, self._egress)
        wanted = check_events(events)
        if len(await self.of(owner)) >= MAX_PER_KEY:
            raise LimitReached(f"a key may have {MAX_PER_KEY} webhooks; delete one first",
                               code="too_many_webhooks")  # fmt: skip
        secret = "whsec_" + secrets.token_urlsafe(32)
        hook = Webhook(new_id("whk"), owner, url, secret, wanted, time.time())
        await self._store.add(hook)
        self._run(hook)
        return hook, secret

    async def remove(self, owner: str, hook_id: str) -> Webhook:
        check_id(hook_id, "whk")
        await self.sync()
        hook = self._hooks.get(hook_id)
        if hook is None or hook.owner != owner:
            raise NotFound(f"no webhook {hook_id}", code="webhook_not_found")
        await self._store.remove(hook_id)
        self._stop(hook_id)
        return hook

    def _stop(self, hook_id: str) -> None:
        self._hooks.pop(hook_id, None)
        self._queues.pop(hook_id, None)
        if (task := self._senders.pop(hook_id, None)) is not None:
            task.cancel()

    def publish(self, owner: str, event: dict[str, Any]) -> None:
        """Queue `event` (of `owner`'s sandbox) for every webhook that wants it; never waits."""
        for hook in self._hooks.values():
            if hook.owner not in (owner, OPERATOR) or event.get("type") not in hook.events:
                continue
            queue = self._queues[hook.id]
            if queue.full():
                queue.get_nowait()  # a receiver that cannot keep up loses the oldest
                log.warning("webhook %s is behind: an event was dropped", hook.id)
            queue.put_nowait({**event, "key_id": owner} if hook.owner == OPERATOR else event)

    def _run(self, hook: Webhook) -> None:
        self._hooks[hook.id] = hook
        self._queues[hook.id] = asyncio.Queue(QUEUED)
        self._senders[hook.id] = asyncio.create_task(self._send_all(hook))

    async def _send_all(self, hook: Webhook) -> None:
        queue = self._queues[hook.id]
        while True:
            event = await queue.get()
            body = json.dumps({"id": new_id("evt"), "type": event["type"],
                               "created": time.time(), "data": event}).encode()  # fmt: skip
            for delay in (*RETRIES, None):
                if await asyncio.to_thread(self._deliver, hook, body):
                    break
                if delay is None:
                    log.warning("webhook %s: gave up on an event after %d tries", hook.id,
                                len(RETRIES) + 1)  # fmt: skip
                    break
                await asyncio.sleep(delay)

    def _deliver(self, hook: Webhook, body: bytes) -> bool:
        client = self._trusted if hook.owner == OPERATOR else self._guarded
        now = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "Corral-Signature": signature(hook.secret, now, body),
            "User-Agent": "corral-webhooks",
        }
        try:
            answer = client.post(hook.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            log.info("webhook %s: %s", hook.id, exc)
            return False
        with contextlib.suppress(Exception):
            answer.close()
        return 200 <= answer.status_code < 300
