"""`corral mcp`: Corral's sandboxes as an MCP server over stdio, for desktop agents."""

from __future__ import annotations

import asyncio

from corral.cli._common import ApiKey, Url, app, fail
from corral.client import AsyncClient
from corral.core.errors import CorralError


@app.command("mcp")
def mcp(url: Url = None, api_key: ApiKey = None) -> None:
    """Serve Corral's tools over MCP on stdin and stdout (for Claude Desktop, Claude Code,
    Cursor). Each session gets its own sandbox, created on first use, ended with the session."""
    from corral.tools.mcp_server import serve_stdio  # only this command needs the mcp SDK

    async def run() -> None:
        async with AsyncClient(url=url, api_key=api_key) as client:
            await serve_stdio(client)

    try:
        asyncio.run(run())
    except CorralError as error:
        fail(error)
