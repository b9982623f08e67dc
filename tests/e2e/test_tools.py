"""Sandboxes as an agent's tools: function calling in OpenAI's and Anthropic's formats, with
recorded tool calls (no vendor is called), and MCP through the official client over stdio,
against a real server."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from mcp.client import Client as McpClient
from mcp.client.stdio import StdioServerParameters

import corral
from corral.tools import TOOLS, Toolbox, anthropic_call, anthropic_tools, openai_call, openai_tools
from corral.tools.toolbox import MAX_TEXT
from tests.conftest import require_runtime
from tests.e2e.conftest import Server

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()


def openai_tool_call(name: str, arguments: dict[str, Any] | str, call_id: str = "call_1") -> Any:
    """A `tool_calls` entry as OpenAI's chat completions API sends it."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": text}}


def tool_use(name: str, arguments: Any, block_id: str = "toolu_1") -> dict[str, Any]:
    """A `tool_use` content block as Anthropic's Messages API sends it."""
    return {"type": "tool_use", "id": block_id, "name": name, "input": arguments}


@pytest.fixture
async def toolbox(server: Server) -> AsyncIterator[Toolbox]:
    """A function-calling session against the test server, its sandbox ended after the test."""
    async with corral.AsyncClient(url=server.url, api_key=server.admin_key) as client:
        made = Toolbox(client, runtime="namespaces")
        try:
            yield made
        finally:
            await made.close()


def test_the_schemas_in_each_vendors_format() -> None:
    names = [t.name for t in TOOLS]
    assert [t["function"]["name"] for t in openai_tools()] == names
    assert [t["name"] for t in anthropic_tools()] == names
    for tool in openai_tools():
        schema = tool["function"]["parameters"]
        assert schema["type"] == "object" and schema["additionalProperties"] is False
        assert tool["function"]["description"]
        for prop in schema["properties"].values():
            assert prop["description"]
            if prop["type"] == "array":  # of strings (egress rules), with the items' type
                assert prop["items"] == {"type": "string"}
            else:
                assert prop["type"] in ("string", "integer", "number", "boolean")
    run_code = next(t for t in anthropic_tools() if t["name"] == "run_code")
    assert run_code["input_schema"]["required"] == ["code"]


async def test_function_calls_in_both_formats(toolbox: Toolbox) -> None:
    made = await openai_call(toolbox, openai_tool_call("run_code", {"code": "x = 6"}))
    assert made["role"] == "tool" and made["tool_call_id"] == "call_1"
    answer = await openai_call(toolbox, openai_tool_call("run_code", {"code": "x * 7"}))
    assert "result: 42" in answer["content"]
    shown = await anthropic_call(
        toolbox,
        tool_use(
            "run_code",
            {
                "code": f"class P:\n    def _repr_png_(self):\n        import base64\n"
                f"        return base64.b64decode('{PNG}')\nP()"
            },
        ),
    )
    assert shown["tool_use_id"] == "toolu_1" and shown["is_error"] is False
    assert shown["content"][1] == {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": PNG},
    }
    steps = [
        ("write_file", {"path": "/root/app.py", "content": "a = 1\nb = 2\na = 3\n"}),
        ("edit_file", {"path": "/root/app.py", "old_text": "b = 2", "new_text": "b = 20"}),
        ("read_file", {"path": "/root/app.py"}),
        ("search_files", {"pattern": "^b =", "glob": "*.py"}),
        ("list_files", {"path": "/root"}),
        ("run_command", {"command": "python3 /root/app.py && echo ran", "timeout": 30}),
    ]
    texts = [(await toolbox.call(name, args)).text for name, args in steps]
    assert "b = 20" in texts[2] and "/root/app.py:2:b = 20" in texts[3]
    assert "/root/app.py" in texts[4] and "exit code: 0" in texts[5] and "ran" in texts[5]


async def test_bad_calls_are_tool_errors_the_model_can_read(toolbox: Toolbox) -> None:
    cases = [
        (openai_tool_call("no_such_tool", {}), "there is no tool"),
        (openai_tool_call("run_code", "{not json"), "not JSON"),
        (openai_tool_call("run_code", {"code": 5}), "must be a string"),
        (openai_tool_call("run_code", {}), "needs code"),
        (openai_tool_call("run_code", {"code": "1", "bogus": 1}), "no argument bogus"),
        (openai_tool_call("read_file", {"path": "/root/missing"}), "file_not_found"),
        (
            openai_tool_call("run_code", {"code": "1", "sandbox_id": "sb-nope"}),
            "invalid_id",
        ),
        (openai_tool_call("run_code", {"code": "1", "language": "cobol"}), "one of"),
        (
            openai_tool_call(
                "edit_file", {"path": "/etc/hostname", "old_text": "zz9", "new_text": "y"}
            ),
            "does not appear",
        ),
    ]
    for call, says in cases:
        answer = await openai_call(toolbox, call)
        assert answer["content"].startswith("Error: ") and says in answer["content"], answer
    failed = await anthropic_call(toolbox, tool_use("read_file", {"path": "/nope"}))
    assert failed["is_error"] is True and "file_not_found" in failed["content"][0]["text"]
    raised = await toolbox.call("run_code", {"code": "1/0"})
    assert raised.is_error and "ZeroDivisionError" in raised.text


async def test_long_output_keeps_both_ends_and_the_rest_in_a_file(toolbox: Toolbox) -> None:
    result = await toolbox.call("run_command", {"command": "seq 1 20000; echo the-end"})
    assert len(result.text) < MAX_TEXT + 500
    assert result.text.split("stdout:\n")[1].startswith("1\n2\n3\n")
    assert result.text.rstrip().endswith("the-end")
    path = result.text.split("full stdout in ")[1].split(" ")[0]
    whole = await toolbox.call("read_file", {"path": path})
    assert "the-end" in (await (await toolbox.sandbox(None)).files.read_text(path))
    assert not whole.is_error


async def test_an_agent_creates_a_sandbox_with_egress_rules(toolbox: Toolbox) -> None:
    for arguments, message in (
        ({"allow": ["pypi.org"]}, "network 'internet'"),
        ({"network": "internet", "allow": ["http://pypi.org/"]}, "http://pypi.org/"),
        ({"network": "internet", "deny": "pypi.org"}, "deny of create_sandbox must be an array"),
    ):
        refused = await toolbox.call("create_sandbox", arguments)
        assert refused.is_error and message in refused.text, refused.text
    made = await toolbox.call(
        "create_sandbox", {"network": "internet", "allow": ["pypi.org"], "deny": ["10.0.0.0/8"]}
    )
    assert not made.is_error, made.text
    network = (await toolbox.sandbox(None)).network
    assert network == corral.Network(allow=["pypi.org"], deny=["10.0.0.0/8"])


def wait_for_page(url: str, headers: dict[str, str]) -> None:
    """Until the server behind a preview answers 200 (it may still be starting)."""
    for _ in range(300):
        if httpx.get(url, headers=headers, timeout=10).status_code == 200:
            return
        time.sleep(0.1)
    raise AssertionError(f"{url} never answered")


def mcp_server(server: Server) -> StdioServerParameters:
    env = {**os.environ, "CORRAL_URL": server.url, "CORRAL_API_KEY": server.admin_key}
    return StdioServerParameters(command=sys.executable, args=["-m", "corral", "mcp"], env=env)


@pytest.mark.parametrize("runtime", ["namespaces", "gvisor"])
async def test_every_tool_over_mcp_stdio(server: Server, runtime: str) -> None:
    require_runtime(runtime)
    async with McpClient(mcp_server(server)) as mcp:
        listed = await mcp.list_tools()
        assert [t.name for t in listed.tools] == [t.name for t in TOOLS]
        assert all(t.input_schema["type"] == "object" for t in listed.tools)

        async def call(tool: str, **arguments: Any) -> Any:
            return await mcp.call_tool(tool, arguments)

        def text(result: Any) -> str:
            return result.content[0].text

        made = await call("create_sandbox", runtime=runtime)
        sandbox_id = made.structured_content["sandbox_id"]
        assert not made.is_error and runtime in text(made)
        assert "result: 42" in text(await call("run_code", code="6 * 7"))
        assert "exit code: 0" in text(await call("run_command", command="echo hi > /root/f"))
        assert "wrote" in text(await call("write_file", path="/root/g.txt", content="one two"))
        assert text(await call("read_file", path="/root/g.txt")) == "one two"
        assert "replaced 1" in text(
            await call("edit_file", path="/root/g.txt", old_text="two", new_text="three")
        )
        assert "/root/g.txt:1:one three" in text(await call("search_files", pattern="three"))
        assert "/root/f" in text(await call("list_files"))
        offline = await call("upload_from_url", url="https://example.com/", path="/root/x")
        assert offline.is_error and "could not download" in text(offline)  # network "none"
        started = await call("run_command", command="echo up; sleep 300", background=True)
        assert "pid" in text(started)
        log = started.structured_content["log"]
        assert "up" in text(await call("run_command", command=f"sleep 0.5; cat {log}"))
        await call("run_command", command="python3 -m http.server 8000", background=True)
        exposed = await call("expose_port", port=8000)
        assert not exposed.is_error and "/preview/" in text(exposed)
        preview = exposed.structured_content
        wait_for_page(preview["url"], preview["headers"])
        assert sandbox_id in text(await call("list_sandboxes"))
        assert "paused" in text(await call("pause_sandbox"))
        assert "running" in text(await call("resume_sandbox"))
        if runtime == "gvisor":
            assert "hibernated" in text(await call("hibernate_sandbox"))
            assert "running" in text(await call("resume_sandbox"))
            snapshot = await call("snapshot_sandbox", name="mcp-test")
            assert not snapshot.is_error, text(snapshot)
            fork = await call("fork_sandbox", count=1)
            assert not fork.is_error, text(fork)  # (once failed in a full run: say why)
            (copy,) = fork.structured_content["sandbox_ids"]
            assert "terminated" in text(await call("terminate_sandbox", sandbox_id=copy))
        else:
            refused = await call("hibernate_sandbox")
            assert refused.is_error and "not_supported" in text(refused)
        wrong = await mcp.call_tool("run_code", {"code": 42})
        assert wrong.is_error and "must be a string" in text(wrong)
        missing = await call("read_file", path="/root/none")
        assert missing.is_error and "file_not_found" in text(missing)
        assert "terminated" in text(await call("terminate_sandbox"))
    # The session's sandbox was ended by terminate_sandbox; a new session makes its own.
    async with corral.AsyncClient(url=server.url, api_key=server.admin_key) as client:
        assert (await corral.AsyncSandbox.connect(sandbox_id, client=client)).state.value == (
            "terminated"
        )


async def test_an_mcp_session_ends_its_own_sandbox(server: Server) -> None:
    async with McpClient(mcp_server(server)) as mcp:
        result = await mcp.call_tool("run_code", {"code": "import os; os.getpid()"})
        assert not result.is_error
        sandbox_id = result.structured_content["sandbox_id"]
    async with corral.AsyncClient(url=server.url, api_key=server.admin_key) as client:
        sandbox = await corral.AsyncSandbox.connect(sandbox_id, client=client)
        for _ in range(300):  # the end may still be under way when the client returns
            if (await sandbox.info()).state is corral.SandboxState.TERMINATED:
                break
            await asyncio.sleep(0.1)
        assert (await sandbox.info()).state is corral.SandboxState.TERMINATED


async def test_mcp_over_streamable_http_as_the_calling_key(server: Server) -> None:
    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    url = f"{server.url}/mcp"
    headers = {"Authorization": f"Bearer {server.admin_key}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=120) as http,
        McpClient(streamable_http_client(url, http_client=http)) as mcp,
    ):
        listed = await mcp.list_tools()
        assert [t.name for t in listed.tools] == [t.name for t in TOOLS]
        await mcp.call_tool("create_sandbox", {"runtime": "namespaces"})
        await mcp.call_tool("run_code", {"code": "x = 2"})
        answer = await mcp.call_tool("run_code", {"code": "x * 21"})
        assert not answer.is_error and "result: 42" in answer.content[0].text, answer.content[0]
        wrong = await mcp.call_tool("run_command", {"command": "true", "timeout": "soon"})
        assert wrong.is_error and "must be a number" in wrong.content[0].text
        sandbox_id = answer.structured_content["sandbox_id"]
    async with corral.AsyncClient(url=server.url, api_key=server.admin_key) as client:
        info = await (await corral.AsyncSandbox.connect(sandbox_id, client=client)).info()
        # An HTTP session's sandbox also ends by itself once unused (a client may never hang up).
        assert (info.spec.idle_timeout, info.spec.on_idle) == (900, "terminate")
        await (await corral.AsyncSandbox.connect(sandbox_id, client=client)).terminate()


def test_mcp_over_http_needs_a_key(server: Server) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    for headers in ({}, {"Authorization": "Bearer not-a-key"}):
        answer = httpx.post(f"{server.url}/mcp", json=body, headers=headers, timeout=30)
        assert answer.status_code == 401, answer.text
        assert answer.json()["error"]["code"] == "unauthorized"
