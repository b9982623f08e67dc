"""The code interpreter in the SDK: `run_code` and code contexts, as methods of a sandbox.

`AsyncSandbox` inherits them from `AsyncCode`; `Sandbox` has their synchronous twins.
"""

from __future__ import annotations

import abc
import builtins
import inspect
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

from corral.client._client import AsyncClient
from corral.client._code_stream import CodeStream
from corral.core.code import CodeContext, Execution, ExecutionError, Result
from corral.core.errors import SandboxFailed

T = TypeVar("T")
Callback = Callable[[T], Awaitable[None] | None]


class AsyncCode(abc.ABC):
    """A sandbox's code interpreter: stateful contexts, rich results (`AsyncSandbox` has it)."""

    client: AsyncClient
    _code_stream: CodeStream | None = None  # the sandbox's code WebSocket, once opened

    @abc.abstractmethod
    def _path(self, suffix: str = "") -> str:
        """The sandbox's API path, with `suffix`."""

    async def run_code(
        self,
        code: str,
        language: str = "python",
        *,
        context: str | CodeContext | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        on_stdout: Callback[str] | None = None,
        on_stderr: Callback[str] | None = None,
        on_result: Callback[Result] | None = None,
        on_error: Callback[ExecutionError] | None = None,
    ) -> Execution:
        """Run `code` in a code context, where variables last from one call to the next.

        Without `context`, the language's default context runs it (made on first use). The
        value of the last expression is the main result; `display(obj)` and open matplotlib
        figures add others, each a MIME bundle (`result.png`, `result.html`, ...). The code's
        own errors, a `timeout` (which interrupts the code and keeps its variables) and a lost
        interpreter are `execution.error`, not exceptions. Callbacks get each piece as it
        happens. Raises `UnsupportedLanguage` (422) or `ContextNotFound` (404) for a request
        that cannot run.

        Example:
            >>> _ = sandbox.run_code("x = 6")
            >>> sandbox.run_code("x * 7").text
            '42'
        """
        body = {
            "code": code,
            "language": language,
            "context": context.id if isinstance(context, CodeContext) else context,
            "env": dict(env or {}),
            "timeout": timeout,
        }
        callbacks: dict[str, Callback[Any] | None] = {
            "stdout": on_stdout,
            "stderr": on_stderr,
            "result": on_result,
            "error": on_error,
        }
        execution = Execution()
        async for event in self._code_events(body):
            added = execution.add(event)
            callback = callbacks.get(event["type"])
            if callback is not None and added is not None:
                done = callback(added)
                if inspect.isawaitable(done):
                    await done
            if event["type"] == "end":
                return execution
        raise SandboxFailed("the server ended the execution's stream before its end")

    async def _code_events(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """An execution's events: over the sandbox's code WebSocket, opened on first use and
        kept; over a POST where WebSockets cannot go (a client of an app in this process)."""
        if self.client._app is not None:
            async with self.client.stream("POST", self._path("/code"), json=body) as response:
                for line in (await response.aread()).decode().splitlines():
                    yield json.loads(line)
            return
        stream: CodeStream | None = getattr(self, "_code_stream", None)
        if stream is None or stream.closed:
            stream = CodeStream(await self.client.websocket(self._path("/code/stream")))
            self._code_stream = stream
        async for event in stream.run(body):
            yield event

    async def create_code_context(
        self,
        language: str = "python",
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> CodeContext:
        """A new code context, with its own interpreter, working directory and environment."""
        body = {"language": language, "cwd": cwd, "env": dict(env or {})}
        made = await self.client.request("POST", self._path("/code/contexts"), json=body)
        return CodeContext.from_dict(made)

    async def list_code_contexts(self) -> builtins.list[CodeContext]:
        """The sandbox's code contexts."""
        found = await self.client.request("GET", self._path("/code/contexts"))
        return [CodeContext.from_dict(item) for item in found]

    async def restart_code_context(self, context: str | CodeContext) -> CodeContext:
        """A fresh interpreter for the context: its variables are gone, its settings kept."""
        path = self._path(f"/code/contexts/{_id(context)}/restart")
        return CodeContext.from_dict(await self.client.request("POST", path))

    async def remove_code_context(self, context: str | CodeContext) -> None:
        """End the context's interpreter and forget it."""
        await self.client.request("DELETE", self._path(f"/code/contexts/{_id(context)}"))


def _id(context: str | CodeContext) -> str:
    return context.id if isinstance(context, CodeContext) else context
