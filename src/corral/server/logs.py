"""The server's logs: plain text, or one JSON object per line (`corral serve --log-format json`)
with the request id, the key and the sandbox of the request each line was written for.

`RequestContext`, an ASGI middleware, gives each HTTP request an id (the client's
`X-Request-Id` if it sends a short one of letters, digits, '-', '_' and '.', else a new one),
echoed in the response's `X-Request-Id`, and notes the sandbox its path names; authentication
notes the key. Lines written while a request is handled carry all three.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import secrets
import sys
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
KEY_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("key_id", default=None)
SANDBOX_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("sandbox_id", default=None)

_GIVEN_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_SANDBOX_IN_PATH = re.compile(r"/sandboxes/(sb-[a-z0-9]{1,64})(?:/|$)")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and the request's ids."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": REQUEST_ID.get(),
            "key_id": KEY_ID.get(),
            "sandbox_id": SANDBOX_ID.get(),
        }
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def use_json(level: str) -> None:
    """Send every logger's lines, uvicorn's included, to stderr as JSON objects."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


class RequestContext:
    """ASGI middleware: the request id (given or new, echoed back) and the sandbox of a path."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or ()).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _GIVEN_ID.match(given) else _new_id()
        found = _SANDBOX_IN_PATH.search(str(scope.get("path", "")))
        tokens = (
            REQUEST_ID.set(request_id),
            SANDBOX_ID.set(found.group(1) if found else None),
            KEY_ID.set(None),
        )

        async def with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, with_id)
        finally:
            for var, token in zip((REQUEST_ID, SANDBOX_ID, KEY_ID), tokens, strict=True):
                var.reset(token)


def _new_id() -> str:
    return f"req-{int(time.time()):x}{secrets.token_hex(6)}"
