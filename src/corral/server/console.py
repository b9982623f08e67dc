"""The web console at /ui: the files Vite builds from console/ into static/console, shipped
in the Python package (a `pip install` needs no Node), served with headers that keep the page
to itself: only its own scripts, no framing, no referrer.

The console is a client of the API like any other: it logs in with an API key, kept in the
browser tab's session storage, and sends it with each request (its terminal's WebSocket
offers it as a subprotocol, see `corral.server.auth.websocket_authorization`).
"""

from __future__ import annotations

from pathlib import Path

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

from corral.core.errors import NotFound
from corral.server.errors import error_response

ASSETS = Path(__file__).parent / "static" / "console"
HEADERS = {
    # xterm.js sets styles from script; nothing else is inline.
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
        "form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class Console:
    """The console's files, each answer with `HEADERS`."""

    def __init__(self, assets: Path = ASSETS) -> None:
        self._assets = assets
        self._files = StaticFiles(directory=assets, html=True, check_dir=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not (self._assets / "index.html").is_file():
            missing = NotFound(
                "this installation has no web console files: run `npm ci && npm run build` "
                "in console/",
                code="console_not_built",
            )
            await error_response(missing)(scope, receive, send)
            return

        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).update(HEADERS)
            await send(message)

        await self._files(scope, receive, secured)


def routes() -> list[BaseRoute]:
    """`/ui` (to `/ui/`) and everything under it."""

    async def to_slash(request: Request) -> Response:
        return RedirectResponse("/ui/")

    return [Route("/ui", to_slash), Mount("/ui", app=Console())]
