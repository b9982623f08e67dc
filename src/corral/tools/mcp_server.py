"""The tools (see `catalog`) as an MCP server, on the official `mcp` SDK.

`corral mcp` serves them over stdio to a desktop client (Claude Desktop, Claude Code,
Cursor), talking to a Corral server with CORRAL_URL and CORRAL_API_KEY. The session's
default sandbox is created on first use and ended with the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any

import mcp_types as types
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server

from corral.client import AsyncClient
from corral.tools.catalog import TOOLS
from corral.tools.toolbox import Toolbox, ToolResult

INSTRUCTIONS = (
    "Corral runs code in isolated Linux sandboxes. run_code keeps variables between calls "
    "(Python, JavaScript, Bash); run_command runs shell commands; the file tools read, write, "
    "search and edit files. Calls without sandbox_id share this session's sandbox, created on "
    "first use; create_sandbox chooses its image (code-interpreter has numpy, pandas and "
    "matplotlib), runtime and network."
)


def tool_content(result: ToolResult) -> types.CallToolResult:
    """A tool's result as MCP content: its text, its images, its data; errors as `isError`."""
    content: list[Any] = [types.TextContent(type="text", text=result.text)]
    content += [
        types.ImageContent(type="image", data=data, mime_type=mime) for mime, data in result.images
    ]
    return types.CallToolResult(
        content=content, is_error=result.is_error, structured_content=result.data
    )


async def list_tools(_ctx: Any, _params: Any) -> types.ListToolsResult:
    """Every tool of the catalog, with its description and JSON schema."""
    tools = [
        types.Tool(name=t.name, description=t.description, input_schema=t.schema) for t in TOOLS
    ]
    return types.ListToolsResult(tools=tools)


def server(toolbox: Toolbox) -> Server[Any]:
    """An MCP server whose tool calls `toolbox` carries out."""

    async def call_tool(_ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        return tool_content(await toolbox.call(params.name, params.arguments or {}))

    return Server(
        "corral",
        instructions=INSTRUCTIONS,
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )


async def serve_stdio(client: AsyncClient) -> None:
    """Serve one MCP session over stdin and stdout until the client hangs up, then end the
    session's sandbox. A client ends a session by closing our stdin and, two seconds on,
    sending SIGTERM: SIGTERM stops serving, but not the ending of the sandbox."""
    toolbox = Toolbox(client)
    loop = asyncio.get_running_loop()
    serving = asyncio.ensure_future(_serve(server(toolbox)))
    loop.add_signal_handler(signal.SIGTERM, serving.cancel)
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await serving
    finally:
        loop.add_signal_handler(signal.SIGTERM, lambda: None)  # SIGKILL still ends us
        await toolbox.close()


async def _serve(mcp: Server[Any]) -> None:
    async with stdio_server() as (read, write):
        await mcp.run(read, write, mcp.create_initialization_options())
