"""MCP over streamable HTTP at `/mcp`: the tools of `corral.tools` for clients that connect by
URL, authenticated with the same API keys as the rest of the API.

Each MCP session's tools run as the key that opened it, through this server's own API in this
process (`AsyncClient._in_process`), so they reach exactly what that key may reach and nothing
else. A session's own sandbox is created on first use and ended when the client ends the
session (or by its idle policy: 15 minutes unused and it terminates, for a client that never
says goodbye). Clients of the stateless protocol keep no session: their calls share one sandbox
per key.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import mcp_types as types
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from corral.client import AsyncClient
from corral.core.errors import CorralError
from corral.server.auth import tenant_of
from corral.server.service import Service
from corral.tools.mcp_server import INSTRUCTIONS, list_tools, tool_content
from corral.tools.toolbox import Toolbox

SESSION_SANDBOX = {"idle_timeout": 900.0, "on_idle": "terminate"}


class McpEndpoint:
    """The ASGI endpoint at /mcp, with one toolbox per MCP session and key."""

    def __init__(self, service: Service, app: Any) -> None:
        self._service = service
        self._app = app  # the whole API, which each session's tools call as its key
        self._toolboxes: dict[tuple[str, str], Toolbox] = {}  # by (MCP session, key)
        server: Server[Any] = Server(
            "corral", instructions=INSTRUCTIONS, on_list_tools=list_tools, on_call_tool=self._call
        )
        # The key is the defence here (a page cannot send it), so any Host may connect.
        security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
        self._manager = StreamableHTTPSessionManager(app=server, security_settings=security)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Serve MCP sessions while the block runs (the server's lifespan)."""
        async with self._manager.run():
            try:
                yield
            finally:
                for toolbox in list(self._toolboxes.values()):
                    await toolbox.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope)
        address = request.client.host if request.client else "unknown"
        try:
            await tenant_of(self._service, request.headers.get("authorization"), address)
        except CorralError as error:
            answer = JSONResponse(error.to_dict(), status_code=error.status_code)
            await answer(scope, receive, send)
            return
        await self._manager.handle_request(scope, receive, send)
        session = request.headers.get("mcp-session-id")
        if request.method == "DELETE" and session:
            await self.ended(session)

    async def _call(self, ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        headers = ctx.request.headers if ctx.request is not None else {}
        secret = headers.get("authorization", "").partition(" ")[2].strip()
        # A session where the client keeps one (mcp-session-id); a stateless client's calls
        # all share the key's own.
        session = headers.get("mcp-session-id", "")
        box = self._toolboxes.get((session, secret))
        if box is None:
            client = AsyncClient._in_process(self._app, secret)
            box = self._toolboxes[(session, secret)] = Toolbox(client, **SESSION_SANDBOX)
        return tool_content(await box.call(params.name, params.arguments or {}))

    async def ended(self, session: str) -> None:
        """The client ended MCP session `session` (DELETE): end its sandboxes."""
        for key in [key for key in self._toolboxes if key[0] == session]:
            box = self._toolboxes.pop(key)
            await box.close()
            await box.client.aclose()
