"""HTTP routes for the code interpreter: run code in a sandbox's code contexts, streamed, and
manage the contexts. (What an execution's events are: `corral.core.code`.)"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from corral.core.code import LANGUAGES, CodeContext
from corral.server.auth import SandboxesDep
from corral.server.resources.sandboxes import Sandboxes

router = APIRouter(prefix="/v1/sandboxes/{sandbox_id}/code", tags=["code"])


class RunCode(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str = Field(description="The code to run, as a cell: its last expression is its value.")
    language: str = Field(
        default="python", description=f"One of {', '.join(LANGUAGES)}, where the image has it."
    )
    context: str | None = Field(
        default=None, description="A context's id; without it, the language's default context."
    )
    env: dict[str, str] | None = Field(default=None, description="For this execution only.")
    timeout: float | None = Field(
        default=None, description="Seconds; past it the code is interrupted, the context kept."
    )


class NewContext(BaseModel):
    model_config = ConfigDict(extra="forbid")

    language: str = "python"
    cwd: str | None = None
    env: dict[str, str] | None = None


class ContextOut(BaseModel):
    id: str
    language: str
    cwd: str
    running: bool
    execution_count: int
    restarts: int

    @classmethod
    def of(cls, context: CodeContext) -> ContextOut:
        return cls(**context.to_dict())


@router.post("", response_class=StreamingResponse)
async def run_code(sandbox_id: str, body: RunCode, sandboxes: SandboxesDep) -> Response:
    """Run code in a code context; its events stream as JSON lines (`application/x-ndjson`)
    as they happen: `started`, `stdout`/`stderr`, `result`, `error`, then `end`.

    The code's own errors (an exception, a timeout, a lost interpreter) are an `error` event,
    not an HTTP error; a request that cannot run (unknown language or context) is answered
    before the stream starts. A client that hangs up interrupts the code. (Many executions
    over one connection: the code WebSocket, `/code/stream`.)
    """
    slot, first, events = await open_execution(sandboxes, sandbox_id, body)

    async def lines() -> AsyncIterator[bytes]:
        with slot:
            try:
                async with sandboxes.active(sandbox_id):  # running code is use
                    yield _line(first)
                    async for event in events:
                        yield _line(event)
            finally:
                await events.aclose()  # a client that went away interrupts the code

    return StreamingResponse(lines(), media_type="application/x-ndjson")


async def open_execution(
    sandboxes: Sandboxes, sandbox_id: str, body: RunCode
) -> tuple[contextlib.ExitStack, dict[str, Any], AsyncGenerator[dict[str, Any], None]]:
    """Start running `body`: the key's exec slot it holds (to release when done), its first
    event, and the rest. A request that cannot run raises here, before any event."""
    slot = contextlib.ExitStack()
    slot.enter_context(sandboxes.hold("exec"))  # a key's executions count like its commands
    try:
        events = await sandboxes.run_code(
            sandbox_id,
            body.code,
            language=body.language,
            context=body.context,
            env=body.env,
            timeout=body.timeout,
        )
        first = await anext(events)  # a context that does not exist is a 404, not a stream
    except BaseException:
        slot.close()
        raise
    return slot, first, events


def _line(event: dict[str, object]) -> bytes:
    return (json.dumps(event, separators=(",", ":")) + "\n").encode()


@router.post("/contexts", status_code=201)
async def create_context(sandbox_id: str, body: NewContext, sandboxes: SandboxesDep) -> ContextOut:
    """A new code context: its own interpreter, working directory and environment."""
    sandbox_id, interpreter = await sandboxes.interpreter(sandbox_id)
    made = await interpreter.create_context(
        sandbox_id, language=body.language, cwd=body.cwd, env=body.env
    )
    return ContextOut.of(made)


@router.get("/contexts")
async def list_contexts(sandbox_id: str, sandboxes: SandboxesDep) -> list[ContextOut]:
    """The sandbox's code contexts (a language's default one appears on its first use)."""
    sandbox_id, interpreter = await sandboxes.interpreter(sandbox_id)
    return [ContextOut.of(found) for found in await interpreter.contexts(sandbox_id)]


@router.post("/contexts/{context_id}/restart")
async def restart_context(sandbox_id: str, context_id: str, sandboxes: SandboxesDep) -> ContextOut:
    """A fresh interpreter for the context: its variables are gone, its id and settings kept."""
    sandbox_id, interpreter = await sandboxes.interpreter(sandbox_id)
    return ContextOut.of(await interpreter.restart_context(sandbox_id, context_id))


@router.delete("/contexts/{context_id}", status_code=204)
async def remove_context(sandbox_id: str, context_id: str, sandboxes: SandboxesDep) -> Response:
    """End the context's interpreter and forget the context."""
    sandbox_id, interpreter = await sandboxes.interpreter(sandbox_id)
    await interpreter.remove_context(sandbox_id, context_id)
    return Response(status_code=204)
