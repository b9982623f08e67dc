"""The tools in OpenAI's and Anthropic's function-calling formats, and their calls carried out.

tools = corral.tools.openai_tools()          # for chat.completions.create(tools=...)
message = await toolbox.openai_call(call)     # a tool_calls entry -> the "tool" message

tools = corral.tools.anthropic_tools()       # for messages.create(tools=...)
block = await toolbox.anthropic_call(block)   # a tool_use block -> its tool_result block
"""

from __future__ import annotations

import json
from typing import Any

from corral.tools.catalog import TOOLS
from corral.tools.toolbox import Toolbox, ToolResult


def openai_tools() -> list[dict[str, Any]]:
    """Every tool as an OpenAI chat-completions tool (`{"type": "function", ...}`)."""
    return [
        {
            "type": "function",
            "function": {"name": t.name, "description": t.description, "parameters": t.schema},
        }
        for t in TOOLS
    ]


def anthropic_tools() -> list[dict[str, Any]]:
    """Every tool as an Anthropic Messages API tool (`{"name", "description", "input_schema"}`)."""
    return [{"name": t.name, "description": t.description, "input_schema": t.schema} for t in TOOLS]


async def openai_call(toolbox: Toolbox, call: dict[str, Any]) -> dict[str, Any]:
    """Carry out one entry of an assistant message's `tool_calls`; the `tool` message to send
    back. OpenAI's tool messages are text: images are named, with their data left out."""
    function = call.get("function") or {}
    try:
        arguments = json.loads(function.get("arguments") or "{}")
    except ValueError as exc:
        result = ToolResult(f"the arguments are not JSON ({exc}); send a JSON object", True)
    else:
        result = await toolbox.call(str(function.get("name")), arguments)
    text = result.text
    if result.images:
        text += f"\n\n({len(result.images)} image(s) produced; their data is in the chart text)"
    if result.is_error:
        text = "Error: " + text
    return {"role": "tool", "tool_call_id": call.get("id"), "content": text}


async def anthropic_call(toolbox: Toolbox, block: dict[str, Any]) -> dict[str, Any]:
    """Carry out one `tool_use` block; its `tool_result` block (images as image blocks)."""
    result = await toolbox.call(str(block.get("name")), block.get("input"))
    content: list[dict[str, Any]] = [{"type": "text", "text": result.text}]
    content += [
        {"type": "image", "source": {"type": "base64", "media_type": mime, "data": data}}
        for mime, data in result.images
    ]
    return {
        "type": "tool_result",
        "tool_use_id": block.get("id"),
        "content": content,
        "is_error": result.is_error,
    }
