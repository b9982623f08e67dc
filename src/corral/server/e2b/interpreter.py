"""The code interpreter as E2B's SDK calls it (`/execute`, `/contexts`) over Corral's.

`/execute` streams E2B's JSON lines: `stdout`/`stderr`, `result` (MIME data as E2B's fields:
`text`, `html`, `png` in base64, ...; Corral's DataFrame and chart data as `data` and `chart`),
`error`, `number_of_executions`, then `end_of_execution`. A client that hangs up interrupts
the code, as with the native API.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from corral.core.code import CHART, DATAFRAME, CodeContext
from corral.core.errors import CorralError, InvalidRequest
from corral.server.e2b import wire
from corral.server.e2b.charts import e2b_chart
from corral.server.e2b.gateway import handled, sandbox_caller
from corral.server.errors import describe_validation
from corral.server.routes.code import RunCode, open_execution

FIELDS = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "text/latex": "latex",
    "application/json": "json",
    "application/javascript": "javascript",
    DATAFRAME: "data",
    CHART: "chart",
}


def _error(error: CorralError) -> Response:
    """The code interpreter's errors: plain text with the status (the SDK shows the body)."""
    if wire.gone(error):
        return PlainTextResponse(f"The sandbox was not found: {error.message}", status_code=502)
    status = {422: 400, 410: 502}.get(error.status_code, error.status_code)
    return PlainTextResponse(f"{error.code}: {error.message}", status_code=status)


code_route = handled(_error)


def result_out(event: dict[str, Any]) -> dict[str, Any]:
    """A Corral result event as E2B's: each known MIME type in its field, the rest in `extra`."""
    out: dict[str, Any] = {"type": "result", "is_main_result": event["is_main_result"]}
    extra: dict[str, Any] = {}
    for mime, value in event["data"].items():
        field = FIELDS.get(mime)
        if field == "chart":
            extra[mime] = value  # Corral's own chart data, and E2B's shape of it
            out[field] = e2b_chart(value)
        elif field is not None:
            out[field] = value
        else:
            extra[mime] = value
    if extra:
        out["extra"] = extra
    return out


def event_out(event: dict[str, Any]) -> list[dict[str, Any]]:
    """E2B's lines for one of Corral's execution events."""
    kind = event["type"]
    if kind in ("stdout", "stderr"):
        return [{"type": kind, "text": event["text"], "timestamp": wire.timestamp(time.time())}]
    if kind == "result":
        return [result_out(event)]
    if kind == "error":
        return [{k: event[k] for k in ("type", "name", "value", "traceback")}]
    if kind == "end":
        count = {"type": "number_of_executions", "execution_count": event["execution_count"]}
        return [count, {"type": "end_of_execution"}]
    return []


def _line(value: dict[str, Any]) -> bytes:
    return (json.dumps(value, separators=(",", ":")) + "\n").encode()


@code_route
async def execute(request: Request) -> Response:
    """POST /execute: run code in a context (or the language's default one), streamed."""
    sandboxes, sandbox_id = await sandbox_caller(request)
    body = await wire.message(request)
    if body.get("context_id") and body.get("language"):
        raise InvalidRequest("give a context_id or a language, not both")
    code = body.get("code")
    if not isinstance(code, str):
        raise InvalidRequest("code is required")
    try:
        run = RunCode(
            code=code,
            language=body.get("language") or "python",
            context=body.get("context_id") or None,
            env=body.get("env_vars") or None,
        )
    except ValidationError as exc:
        raise InvalidRequest(describe_validation(exc.errors())) from None
    slot, first, events = await open_execution(sandboxes, sandbox_id, run)

    async def lines() -> AsyncIterator[bytes]:
        with slot:
            try:
                async with sandboxes.active(sandbox_id):
                    for out in event_out(first):
                        yield _line(out)
                    async for event in events:
                        for out in event_out(event):
                            yield _line(out)
            finally:
                await events.aclose()  # a client that went away interrupts the code

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def context_out(context: CodeContext) -> dict[str, Any]:
    return {"id": context.id, "language": context.language, "cwd": context.cwd}


@code_route
async def create_context(request: Request) -> Response:
    sandboxes, sandbox_id = await sandbox_caller(request)
    body = await wire.message(request)
    sandbox_id, interpreter = await sandboxes.interpreter(sandbox_id)
    made = await interpreter.create_context(
        sandbox_id, language=body.get("language") or "python", cwd=body.get("cwd")
    )
    return JSONResponse(context_out(made))


@code_route
async def list_contexts(request: Request) -> Response:
    sandboxes, sandbox_id = await sandbox_caller(request)
    sandbox_id, interpreter = await sandboxes.interpreter(sandbox_id)
    return JSONResponse([context_out(c) for c in await interpreter.contexts(sandbox_id)])


@code_route
async def restart_context(request: Request) -> Response:
    sandboxes, sandbox_id = await sandbox_caller(request)
    sandbox_id, interpreter = await sandboxes.interpreter(sandbox_id)
    await interpreter.restart_context(sandbox_id, request.path_params["context_id"])
    return JSONResponse({})


@code_route
async def remove_context(request: Request) -> Response:
    sandboxes, sandbox_id = await sandbox_caller(request)
    sandbox_id, interpreter = await sandboxes.interpreter(sandbox_id)
    await interpreter.remove_context(sandbox_id, request.path_params["context_id"])
    return wire.no_content()


@code_route
async def health(request: Request) -> Response:
    await sandbox_caller(request)
    return PlainTextResponse("OK")


ROUTES = [
    Route("/execute", execute, methods=["POST"]),
    Route("/contexts", create_context, methods=["POST"]),
    Route("/contexts", list_contexts, methods=["GET"]),
    Route("/contexts/{context_id}/restart", restart_context, methods=["POST"]),
    Route("/contexts/{context_id}", remove_context, methods=["DELETE"]),
    Route("/health", health, methods=["GET"]),
]
