"""Sandboxes as tools for an agent's model: one catalog of tools (`catalog`), carried out by a
`Toolbox` (`toolbox`), offered through function calling in OpenAI's and Anthropic's formats
(`formats`) and through MCP (`corral.tools.mcp`, `corral mcp`).

Example (Anthropic):
    >>> async with corral.AsyncClient() as client:
    ...     toolbox = Toolbox(client)
    ...     reply = anthropic.messages.create(..., tools=anthropic_tools())
    ...     results = [await anthropic_call(toolbox, b) for b in reply.content
    ...                if b.type == "tool_use"]
    ...     await toolbox.close()
"""

from corral.tools.catalog import TOOLS, Tool
from corral.tools.formats import anthropic_call, anthropic_tools, openai_call, openai_tools
from corral.tools.toolbox import Toolbox, ToolResult

__all__ = [
    "TOOLS",
    "Tool",
    "ToolResult",
    "Toolbox",
    "anthropic_call",
    "anthropic_tools",
    "openai_call",
    "openai_tools",
]
