"""E2B's wire shapes: Connect's JSON envelopes and error codes, and its REST error bodies.

Connect (https://connectrpc.com/docs/protocol) as E2B's SDK speaks it: unary calls are plain
JSON both ways; streams are envelopes, `[flags: 1 byte][length: 4 bytes, big-endian][JSON]`,
ending with an end-of-stream envelope (flags 0x02) that carries `{}` or the error.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from corral.core.errors import (
    CorralError,
    FileExists,
    InvalidRequest,
    PayloadTooLarge,
    SandboxEnded,
    SandboxNotFound,
)

END_STREAM = 0x02
MAX_MESSAGE = 1024 * 1024  # one request message, as the native API's JSON bodies
CONNECT_JSON = "application/connect+json"

# Connect's codes by HTTP status, as the SDK maps them back (e2b/envd/client_shared.py).
_CONNECT_CODES = {
    400: "invalid_argument",
    401: "unauthenticated",
    403: "permission_denied",
    404: "not_found",
    408: "deadline_exceeded",
    409: "failed_precondition",
    410: "unavailable",
    413: "resource_exhausted",
    422: "invalid_argument",
    429: "resource_exhausted",
    503: "unavailable",
    504: "deadline_exceeded",
    507: "resource_exhausted",
}
_STATUS_OF_CODE = {
    "invalid_argument": 400,
    "unauthenticated": 401,
    "permission_denied": 403,
    "not_found": 404,
    "already_exists": 409,
    "failed_precondition": 412,
    "resource_exhausted": 429,
    "deadline_exceeded": 504,
    "unavailable": 503,
    "unimplemented": 501,
    "internal": 500,
}


def gone(error: CorralError) -> bool:
    """Whether `error` says the sandbox itself is not there (ended, or never was)."""
    return isinstance(error, SandboxNotFound | SandboxEnded)


def connect_code(error: CorralError) -> str:
    """The Connect code for one of Corral's errors."""
    if isinstance(error, FileExists):
        return "already_exists"
    if gone(error):
        return "unavailable"  # the SDK's "sandbox not running", from "... was not found"
    return _CONNECT_CODES.get(error.status_code, "internal")


def connect_message(error: CorralError) -> str:
    if gone(error):
        return f"The sandbox was not found: {error.message}"
    return error.message


def connect_error(error: CorralError) -> JSONResponse:
    """A unary call's failure: an HTTP status and `{"code", "message"}`."""
    code = connect_code(error)
    body = {"code": code, "message": connect_message(error)}
    return JSONResponse(body, status_code=_STATUS_OF_CODE[code])


def rest_error(status: int, message: str) -> JSONResponse:
    """E2B's REST and envd error body: `{"code": <HTTP status>, "message"}`."""
    return JSONResponse({"code": status, "message": message}, status_code=status)


def rest_error_of(error: CorralError) -> JSONResponse:
    """The control plane's answer for one of Corral's errors (no sandbox: 404)."""
    status = {422: 400, 410: 404}.get(error.status_code, error.status_code)
    response = rest_error(status, error.message)
    if error.retry_after is not None:
        response.headers["Retry-After"] = str(error.retry_after)
    return response


def envd_error_of(error: CorralError) -> JSONResponse:
    """A sandbox daemon's answer: as the control plane's, but a sandbox that is not there is
    502 "... was not found", which the SDK reads as "not running"."""
    if gone(error):
        return rest_error(502, f"The sandbox was not found: {error.message}")
    return rest_error_of(error)


def envelope(message: dict[str, Any], flags: int = 0) -> bytes:
    payload = json.dumps(message, separators=(",", ":")).encode()
    return struct.pack(">BI", flags, len(payload)) + payload


def end_of_stream(error: CorralError | None = None) -> bytes:
    if error is None:
        return envelope({}, END_STREAM)
    detail = {"code": connect_code(error), "message": connect_message(error)}
    return envelope({"error": detail}, END_STREAM)


async def messages(request: Request) -> AsyncIterator[dict[str, Any]]:
    """The enveloped JSON messages of a streaming request's body, as they arrive."""
    pending = b""
    async for chunk in request.stream():
        pending += chunk
        while len(pending) >= 5:
            flags, length = struct.unpack(">BI", pending[:5])
            if length > MAX_MESSAGE:
                raise PayloadTooLarge(f"a Connect message over {MAX_MESSAGE} bytes")
            if len(pending) < 5 + length:
                break
            payload, pending = pending[5 : 5 + length], pending[5 + length :]
            if flags & END_STREAM:
                return
            yield _object(payload)
    if pending:
        raise InvalidRequest("the request ended inside a Connect envelope")


async def message(request: Request) -> dict[str, Any]:
    """The one request message of a call: plain JSON (unary) or the first envelope (stream)."""
    if request.headers.get("content-type", "").startswith(CONNECT_JSON):
        async for first in messages(request):
            return first
        raise InvalidRequest("the request carries no Connect message")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_MESSAGE:
            raise PayloadTooLarge(f"a request body over {MAX_MESSAGE} bytes")
    return _object(body or b"{}")


def _object(payload: bytes) -> dict[str, Any]:
    try:
        value = json.loads(payload)
    except ValueError:
        raise InvalidRequest("the request message is not JSON") from None
    if not isinstance(value, dict):
        raise InvalidRequest("the request message must be a JSON object")
    return value


def decode_bytes(value: object, what: str) -> bytes:
    """A protobuf `bytes` field: base64 text in JSON."""
    if not isinstance(value, str):
        raise InvalidRequest(f"{what} must be base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise InvalidRequest(f"{what} is not valid base64") from None


def encode_bytes(data: bytes) -> str:
    return base64.b64encode(data).decode()


def timestamp(at: float) -> str:
    """RFC 3339, as E2B writes times (`2026-12-02T07:00:00.123456Z`)."""
    return datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")


def no_content() -> Response:
    return Response(status_code=204)
