"""The code interpreter in the SDK: `run_code` and code contexts, as methods of a sandbox.

`AsyncSandbox` inherits them from `AsyncCode`; `Sandbox` has their synchronous twins.
"""

from __future__ import annotations

import abc
import builtins
import inspect
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from corral.client._client import AsyncClient
from corral.core.code import CodeContext, Execution, ExecutionError, Result
from corral.core.errors import SandboxFailed

if TYPE_CHECKING:
    import httpx

T = TypeVar("T")
Callback = Callable[[T], Awaitable[None] | None]


class AsyncCode(abc.ABC):
    """A sandbox's code interpreter: stateful contexts, rich results (`AsyncSandbox` has it)."""

    client: AsyncClient

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
            >>> sandbox.run_code("x = 6")
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
        live = any(callbacks.values())  # else the whole answer at once: a little faster
        async with self.client.stream("POST", self._path("/code"), json=body) as response:
            async for line in response.aiter_lines() if live else _all_lines(response):
                if not line:
                    continue
                event = json.loads(line)
                added = execution.add(event)
                callback = callbacks.get(event["type"])
                if callback is not None and added is not None:
                    done = callback(added)
                    if inspect.isawaitable(done):
                        await done
                if event["type"] == "end":
                    return execution
        raise SandboxFailed("the server ended the execution's stream before its end")

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


async def _all_lines(response: httpx.Response) -> AsyncIterator[str]:
    for line in (await response.aread()).decode().splitlines():
        yield line


def _id(context: str | CodeContext) -> str:
    return context.id if isinstance(context, CodeContext) else context
