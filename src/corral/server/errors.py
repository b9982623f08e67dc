"""How the HTTP API reports errors: always `{"error": {"code", "message"}}`, never a traceback.

Corral's own errors carry their status and code. Validation errors become 400s that name the
field; malformed JSON is `invalid_json`; unknown endpoints `not_found`; a body over the limit
`payload_too_large` (413); anything unexpected a 500 `internal_error`, logged in full on the
server and never shown to the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from corral.core.errors import CorralError, InvalidRequest, PayloadTooLarge
from corral.server import audit
from corral.server.metrics import ERRORS

log = logging.getLogger("corral.server")

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}
# What an error answered before its request's body arrived waits for: the rest of the body, read
# and dropped (`EarlyAnswers`), up to this many bytes and seconds.
DRAIN_BYTES = 64 * 1024 * 1024
DRAIN_SECONDS = 10.0


def error_response(error: CorralError) -> JSONResponse:
    ERRORS.labels(error.code, str(error.status_code)).inc()
    audit.failed(error.code)
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
    return JSONResponse(error.to_dict(), status_code=error.status_code, headers=headers)


def describe_validation(errors: Sequence[Any]) -> str:
    """One readable sentence per pydantic error: where, and what is wrong."""
    parts = []
    for error in errors[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        kind = error.get("type", "")
        if kind == "extra_forbidden":
            parts.append(f"unknown field {where!r}; remove it (see /openapi.json for the fields)")
        elif kind == "missing":
            parts.append(f"{where} is required")
        else:
            parts.append(f"{where or 'body'}: {error.get('msg', 'invalid')}")
    return "; ".join(parts)


def install(app: FastAPI) -> None:
    """Register the error handlers on `app`."""

    @app.exception_handler(CorralError)
    async def corral_error(request: Request, exc: CorralError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(
                InvalidRequest(
                    "the request body is not valid JSON; send a JSON object",
                    code="invalid_json",
                )
            )
        return error_response(InvalidRequest(describe_validation(errors)))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        audit.failed(code)
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no endpoint {request.method} {request.url.path}; see /docs"
        elif exc.status_code == 405:
            message = f"{request.url.path} does not accept {request.method}; see /docs"
        body = {"error": {"code": code, "message": message}}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        body = {
            "error": {"code": "internal_error", "message": "internal error; see the server log"}
        }
        return JSONResponse(body, status_code=500)


class BodyLimit:
    """Refuse request bodies over `limit` bytes with a 413, before or while they arrive.

    Routes for which `unlimited(scope)` is true (file uploads, which stream to the sandbox's
    disk and are bounded by its quota) pass through.
    """

    def __init__(
        self, app: ASGIApp, limit: int, unlimited: Callable[[Scope], bool] = lambda s: False
    ) -> None:
        self.app = app
        self.limit = limit
        self.unlimited = unlimited

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.unlimited(scope):
            await self.app(scope, receive, send)
            return
        too_large = PayloadTooLarge(
            f"the request body is over {self.limit} bytes; upload files with "
            "PUT /v1/sandboxes/{id}/files/content, which streams"
        )
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await _send_error(send, too_large)
                return
        received = 0
        exceeded = started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    exceeded = True
                    raise too_large
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded and not started:
                return  # whatever the app makes of the cut-off body, the answer is a 413
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except PayloadTooLarge:
            if started:
                raise
        if exceeded and not started:
            await _send_error(send, too_large)


class EarlyAnswers:
    """An error answered before the request's body has arrived (a 413 from the body's declared
    length, a 404 or 401 for an upload) waits for the rest of the body, read and dropped.

    Otherwise the server closes the connection with the body unread, the client's next write
    meets a reset, and the client reports a broken connection instead of the error (httpx and
    the SDK did, for any body past a few MiB). A body longer than `DRAIN_BYTES`, or slower than
    `DRAIN_SECONDS`, is not waited for; nor is one the client holds back until it hears
    `100 Continue`, which then never comes: the answer tells it not to send.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", ()))
        length = headers.get(b"content-length", b"")
        declared = int(length) if length.isdigit() else None
        pending = b"transfer-encoding" in headers or bool(declared)
        if not pending:  # no body: nothing to wait for
            await self.app(scope, receive, send)
            return
        waits = headers.get(b"expect", b"").lower() == b"100-continue"

        async def tracked_receive() -> Message:
            nonlocal pending, waits
            message = await receive()
            waits = False  # uvicorn sends 100 Continue when the body is first asked for
            if message["type"] != "http.request" or not message.get("more_body", False):
                pending = False
            return message

        async def lingering_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                await drain()
            await send(message)

        async def drain() -> None:
            if not pending or waits or (declared or 0) > DRAIN_BYTES:
                return
            dropped = 0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DRAIN_SECONDS):
                    while pending and dropped <= DRAIN_BYTES:
                        dropped += len((await tracked_receive()).get("body", b""))

        await self.app(scope, tracked_receive, lingering_send)


async def _send_error(send: Send, error: CorralError) -> None:
    body = json.dumps(error.to_dict()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status_code,
            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": body})
