"""Previews: HTTP clients reach a port of a sandbox through Corral.

Addressed by host name, `{port}-{sandbox}.{domain}`, when the server has a preview domain
(wildcard DNS), else by path, `/preview/{sandbox}/{port}/...`, which works on one machine
out of the box. A preview's token grants that one port of that one sandbox; it is sent as the
`X-Corral-Preview-Token` header, or once as `?corral_preview_token=`, which sets a cookie
scoped to the preview (host and path) and redirects to the same URL without it, so browsers
and iframes work. Public previews need none. Corral's own tokens, cookies and API keys never
reach the sandbox. A sleeping sandbox is woken by a request, which waits for its port.

Deployments (`corral.server.deployments`) are served here too, publicly: `/deploy/{name}/...`,
or `{name}.{domain}` with a preview domain, goes to the instance serving the deployment now.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import html
import re
from http.cookies import SimpleCookie
from urllib.parse import parse_qsl, urlencode

import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from websockets.exceptions import InvalidHandshake, ProtocolError

from corral.core.errors import CorralError, NotFound, PortClosed, SandboxNotFound
from corral.core.state import SandboxState
from corral.engine.ports import PortStream
from corral.server.deployments.host import DeploymentHost
from corral.server.deployments.spec import NAME as DEPLOYMENT_NAME
from corral.server.previews.proxy import ClientGone, Headers, relay
from corral.server.previews.sockets import Refused, relay_websocket
from corral.server.service import Service

PREFIX = "/preview/"
HEADER = b"x-corral-preview-token"
QUERY = "corral_preview_token"
COOKIE = "corral_preview"
TOKEN_PREFIX = "corral_pv_"  # noqa: S105 - the prefix of the tokens, not one
WAKE_WAIT = 30.0  # seconds a request to a sleeping sandbox waits for its port to answer
_LABEL = re.compile(r"^(\d{1,5})-(sb-[0-9a-z]{16})$")
_PATH = re.compile(r"^/preview/(sb-[0-9a-z]{16})/(\d{1,5})(/.*)?$")
_DEPLOYMENT = re.compile(f"^{DEPLOYMENT_NAME}$")
_DEPLOYMENT_PATH = re.compile(f"^/deploy/({DEPLOYMENT_NAME})(/.*)?$")
INVALID = (
    "This preview link is not valid: its token is wrong, revoked or expired, or it is for "
    "another port or sandbox."
)


@dataclasses.dataclass(frozen=True)
class Address:
    """Where a preview request goes: the sandbox, its port, the path prefix of the preview
    on this server ("" with host names) and the path in the sandbox."""

    sandbox_id: str
    port: int
    prefix: str
    rest: str
    deployment: str | None = None  # a deployment's name (then the sandbox is its instance's)


class PreviewGateway:
    """ASGI middleware: preview and deployment requests go to a sandbox's port, the rest to
    Corral's API."""

    def __init__(
        self, app: ASGIApp, *, service: Service, deployments: DeploymentHost, domain: str | None
    ) -> None:
        self.app = app
        self.service = service
        self.deployments = deployments
        self.domain = domain.lower() if domain else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = self._address(scope) if scope["type"] in ("http", "websocket") else None
        if found is None:
            return await self.app(scope, receive, send)
        if found.deployment is not None:
            return await self._deployment(scope, receive, send, found)
        await self._serve(scope, receive, send, found)

    def _address(self, scope: Scope) -> Address | None:
        # The path as the client sent it (still percent-encoded), which the sandbox's server
        # gets unchanged: `path` is decoded, and re-encoding it would not give it back.
        raw = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        if self.domain is not None:
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
            name, _, domain = host.partition(".")
            match = _LABEL.match(name)
            if match and domain == self.domain:
                return Address(match[2], int(match[1]), "", raw)
            if _DEPLOYMENT.match(name) and domain == self.domain:
                return Address("", 0, "", raw, deployment=name)
        deployed = _DEPLOYMENT_PATH.match(raw)
        if deployed is not None:
            return Address("", 0, f"/deploy/{deployed[1]}", deployed[2] or "", deployed[1])
        match = _PATH.match(raw)
        if match is None:
            return None
        return Address(match[1], int(match[2]), f"{PREFIX}{match[1]}/{match[2]}", match[3] or "")

    async def _serve(self, scope: Scope, receive: Receive, send: Send, to: Address) -> None:
        websocket = scope["type"] == "websocket"
        if not to.rest and not websocket:  # /preview/sb-…/8000 -> …/8000/: relative links work
            return await _redirect(send, to.prefix + "/" + _query(scope, drop=False), [])
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        token, from_query = _token(scope, query)
        if not await self.service.grants.allows(to.sandbox_id, to.port, token):
            return await _refuse(send, websocket, 403, INVALID)
        if from_query and not websocket:  # once in the URL, then a cookie for this preview
            cookie = _cookie(scope, token or "", to.prefix + "/")
            return await _redirect(send, to.prefix + to.rest + _query(scope, drop=True), [cookie])
        await self._relay(scope, receive, send, to)

    async def _deployment(self, scope: Scope, receive: Receive, send: Send, to: Address) -> None:
        """A request to a deployment: to the instance serving it now (public: no token). One
        starting or restarting is waited for as a sleeping sandbox's port is."""
        websocket = scope["type"] == "websocket"
        if not to.rest and not websocket:
            return await _redirect(send, to.prefix + "/" + _query(scope, drop=False), [])
        try:
            runner = self.deployments.get(to.deployment or "")
        except NotFound:
            return await _refuse(send, websocket, 404, f"No deployment {to.deployment} here.")
        if not runner.ready.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WAKE_WAIT):
                    await runner.ready.wait()
        instance = runner.instance
        if instance is None:
            message = f"Deployment {runner.name} is {runner.status}, with no instance serving."
            return await _refuse(send, websocket, 503, message + " Retry shortly.")
        # Counted from here, with no wait before: an update retires an instance only once
        # the requests sent to it are answered.
        with self.deployments.request(instance.sandbox_id):
            port = runner.entry.spec.port
            await self._relay(
                scope,
                receive,
                send,
                dataclasses.replace(to, sandbox_id=instance.sandbox_id, port=port),
            )

    async def _relay(self, scope: Scope, receive: Receive, send: Send, to: Address) -> None:
        websocket = scope["type"] == "websocket"
        connected = await self._connect(to)
        if not isinstance(connected, PortStream):
            return await _refuse(send, websocket, *connected)
        target = (to.rest or "/") + _query(scope, drop=True)
        headers = _headers(scope, to.prefix)
        try:
            with self.service.engine.active(to.sandbox_id):  # in use: the sandbox stays awake
                serve = _socket if websocket else _http
                await serve(connected, scope, receive, send, target=target, headers=headers)
        finally:
            await connected.close()

    async def _connect(self, to: Address) -> PortStream | tuple[int, str]:
        """A connection to the port (waking a sleeping sandbox first), or why there is none."""
        engine = self.service.engine
        try:
            state = engine.get(to.sandbox_id).state
            if state is SandboxState.TERMINATED:
                raise SandboxNotFound(f"sandbox {to.sandbox_id} has ended")
            asleep = state in (SandboxState.PAUSED, SandboxState.HIBERNATED)
            return await engine.ports.connect(to.sandbox_id, to.port, wait=WAKE_WAIT * asleep)
        except SandboxNotFound:
            return 404, f"Sandbox {to.sandbox_id} is not running here (ended, or never was)."
        except PortClosed:
            return 502, _nothing_on(to)
        except CorralError as error:
            return 502, f"Sandbox {to.sandbox_id} cannot be reached: {error.message}"


async def _http(
    stream: PortStream, scope: Scope, receive: Receive, send: Send, *, target: str, headers: Headers
) -> None:
    started = False

    async def tracked(message: Message) -> None:
        nonlocal started
        started = started or message["type"] == "http.response.start"
        await send(message)

    try:
        await relay(
            stream, scope, receive, tracked, target=target.encode("latin-1"), headers=headers
        )
    except ClientGone:
        pass
    except (h11.ProtocolError, CorralError) as error:
        if not started:
            await page(
                send, 502, f"The server in the sandbox did not answer in HTTP/1.1 ({error})."
            )
        else:  # cut short: end what was sent
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _socket(
    stream: PortStream, scope: Scope, receive: Receive, send: Send, *, target: str, headers: Headers
) -> None:
    if (await receive())["type"] != "websocket.connect":
        return
    try:
        await relay_websocket(stream, scope, receive, send, target=target, headers=headers)
    except (Refused, CorralError, InvalidHandshake, ProtocolError):
        with contextlib.suppress(Exception):
            await send({"type": "websocket.close", "code": 1011})


async def _refuse(send: Send, websocket: bool, status: int, message: str) -> None:
    """A page saying why, or for a WebSocket a refusal (which the client sees as 403)."""
    if websocket:
        await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
    else:
        await page(send, status, message)


def _nothing_on(to: Address) -> str:
    return (
        f"Nothing answers on port {to.port} in sandbox {to.sandbox_id}: start a server "
        "listening there (on 127.0.0.1 or 0.0.0.0)."
    )


def _token(scope: Scope, query: dict[str, str]) -> tuple[str | None, bool]:
    """The preview token a request carries, and whether it came in the URL."""
    if QUERY in query:
        return query[QUERY], True
    headers = dict(scope["headers"])
    if HEADER in headers:
        return headers[HEADER].decode("latin-1"), False
    cookie = SimpleCookie()
    try:
        cookie.load(headers.get(b"cookie", b"").decode("latin-1"))
    except Exception:  # a malformed Cookie header carries no token of ours
        return None, False
    return (cookie[COOKIE].value if COOKIE in cookie else None), False


def _query(scope: Scope, *, drop: bool) -> str:
    """The query string, as sent, but for our token's parameter if `drop`."""
    raw = scope.get("query_string", b"").decode("latin-1")
    pairs = parse_qsl(raw, keep_blank_values=True)
    if not (drop and any(k == QUERY for k, _ in pairs)):
        return "?" + raw if raw else ""
    kept = [(k, v) for k, v in pairs if k != QUERY]
    return "?" + urlencode(kept) if kept else ""


def _cookie(scope: Scope, token: str, path: str) -> tuple[bytes, bytes]:
    secure = scope.get("scheme") == "https"
    # An iframe on another site sends a cookie only if SameSite=None, which needs Secure.
    site = "None; Secure" if secure else "Lax"
    value = f"{COOKIE}={token}; Path={path}; HttpOnly; SameSite={site}"
    return (b"set-cookie", value.encode("latin-1"))


def _headers(scope: Scope, prefix: str) -> Headers:
    """The request's headers as the sandbox sees them: Corral's token, cookie and API key
    removed, and where the request came from (X-Forwarded-*) added."""
    kept: Headers = []
    for name, value in scope["headers"]:
        if name in (HEADER, b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-prefix"):
            continue
        if name == b"authorization" and value.lower().startswith(b"bearer corral_"):
            continue
        if name == b"cookie":
            value = _without_our_cookie(value)
            if not value:
                continue
        if name in (
            b"connection",
            b"keep-alive",
            b"te",
            b"trailer",
            b"upgrade",
            b"proxy-connection",
        ):
            continue
        kept.append((name, value))
    client = scope.get("client")
    kept.append((b"x-forwarded-for", (client[0] if client else "unknown").encode()))
    kept.append((b"x-forwarded-proto", str(scope.get("scheme", "http")).encode()))
    if prefix:
        kept.append((b"x-forwarded-prefix", prefix.encode()))
    return kept


def _without_our_cookie(value: bytes) -> bytes:
    parts = [p.strip() for p in value.split(b";")]
    return b"; ".join(p for p in parts if p and not p.startswith(COOKIE.encode() + b"="))


async def _redirect(send: Send, location: str, headers: Headers) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 303,
            "headers": [
                (b"location", location.encode("latin-1")),
                (b"content-length", b"0"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": b""})


async def page(send: Send, status: int, message: str) -> None:
    """A short HTML page saying what is wrong (a person reads it in a browser)."""
    body = (
        "<!doctype html><meta charset=utf-8><title>Corral preview</title>"
        f"<h1>{status}</h1><p>{html.escape(message)}</p>"
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/html; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
