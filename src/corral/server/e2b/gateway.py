"""Who an E2B request is for, and where it goes: routing by E2B's headers, and its keys.

E2B's SDKs send everything to one address when `E2B_API_URL` and `E2B_SANDBOX_URL` name the
same server, and say what each request is for in headers:

    X-API-KEY: <key>                 the control plane (create, list, pause, kill, ...)
    E2b-Sandbox-Id: <sandbox id>     a sandbox's own daemon: commands, files (envd)
    E2b-Sandbox-Port: 49999          ... its code interpreter instead

The control plane takes a Corral API key as E2B's key. Inside a sandbox, a request carries the
sandbox's access token (`X-Access-Token`, or `E2B-Traffic-Access-Token` where the code
interpreter's SDK sends only that), which the control plane hands out with the sandbox: an HMAC
of the sandbox's id under this node's key, good for that one sandbox and no other.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from corral.core.errors import AuthError, CorralError, SandboxEnded, SandboxNotFound
from corral.core.ids import check_id
from corral.core.state import SandboxState
from corral.server import audit
from corral.server.auth import tenant_of
from corral.server.logs import SANDBOX_ID
from corral.server.resources.sandboxes import Sandboxes
from corral.server.service import Service
from corral.server.tenancy import Tenant

CODE_PORT = b"49999"
CONTROL_PATHS = ("/sandboxes", "/v2/sandboxes")
Handler = Callable[[Request], Awaitable[Response]]


class E2bGateway:
    """ASGI middleware: requests in E2B's shapes go to the E2B apps, the rest to Corral's API."""

    def __init__(
        self, app: ASGIApp, *, control: ASGIApp, envd: ASGIApp, interpreter: ASGIApp
    ) -> None:
        self.app = app
        self.control = control
        self.envd = envd
        self.interpreter = interpreter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            if b"e2b-sandbox-id" in headers:
                port = headers.get(b"e2b-sandbox-port")
                target = self.interpreter if port == CODE_PORT else self.envd
                return await target(scope, receive, send)
            path = str(scope.get("path", ""))
            if b"x-api-key" in headers and path.startswith(CONTROL_PATHS):
                return await self.control(scope, receive, send)
        await self.app(scope, receive, send)


def service_of(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


def address_of(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def api_tenant(request: Request) -> Tenant:
    """The tenant of the control plane's `X-API-KEY` (a Corral API key)."""
    key = request.headers.get("x-api-key", "").strip()
    if not key:
        raise AuthError("send a Corral API key as E2B_API_KEY (the X-API-KEY header)")
    return await tenant_of(service_of(request), f"Bearer {key}", address_of(request))


def access_token(service: Service, sandbox_id: str) -> str:
    """The token that opens `sandbox_id`'s daemon and code interpreter, and no other's."""
    label = b"corral e2b access token\0" + sandbox_id.encode()
    return hmac.new(service.engine.keys.current, label, hashlib.sha256).hexdigest()


async def sandbox_caller(request: Request) -> tuple[Sandboxes, str]:
    """The owner's sandboxes and the sandbox's id, for a request to a sandbox's daemon; a token
    that is missing or not this sandbox's is refused (after the failed-login throttle)."""
    service = service_of(request)
    address = address_of(request)
    service.failed_logins.check(address)
    sandbox_id = request.headers.get("e2b-sandbox-id", "")
    token = request.headers.get("x-access-token") or request.headers.get(
        "e2b-traffic-access-token", ""
    )
    checked_id(sandbox_id)
    if not token:
        raise AuthError("send the sandbox's access token (X-Access-Token): E2B's SDK does")
    if not hmac.compare_digest(token, access_token(service, sandbox_id)):
        service.failed_logins.failed(address)
        raise AuthError("this access token is not the sandbox's: connect to it again")
    owner = await service.owner_of(sandbox_id)
    if owner is None:
        raise SandboxNotFound(f"no sandbox {sandbox_id}")
    key = await service.store.find_key(owner)
    if not key.active:
        raise AuthError("the API key that owns this sandbox was revoked")
    audit.identify(key.id)  # the sandbox's token stands for its owner's key
    SANDBOX_ID.set(sandbox_id)
    sandboxes = Sandboxes(Tenant(service, key))
    info = await sandboxes.info(sandbox_id)
    if info.state is SandboxState.TERMINATED:
        raise SandboxEnded(f"sandbox {sandbox_id} ended ({info.end_reason or 'unknown'})")
    return sandboxes, sandbox_id


def checked_id(sandbox_id: str) -> str:
    """A sandbox id from a path: one that cannot be an id is a sandbox that is not there."""
    try:
        return check_id(sandbox_id, "sb")
    except CorralError:
        raise SandboxNotFound(f"no sandbox {sandbox_id[:80]!r}") from None


def handled(
    on_error: Callable[[CorralError], Response],
) -> Callable[[Handler], Handler]:
    """A route whose Corral errors become `on_error`'s response (each surface has its shape)."""

    def wrap(handler: Handler) -> Handler:
        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except CorralError as error:
                audit.failed(error.code)
                return on_error(error)

        route.__name__ = handler.__name__
        route.__doc__ = handler.__doc__
        return route

    return wrap
