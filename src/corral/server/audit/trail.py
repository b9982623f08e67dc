"""What each request did, for the audit log.

`AuditRequests`, an ASGI middleware, follows every API request: its client, the key it proved
(`identify`, called by authentication), its status, the bytes each way, how long it took and
the code of its error (`failed`, called where errors become responses). Commands and code are
recorded as actions (`Action`) with what ran and how it ended, output digests included; a
request that started none is recorded as itself, named by its route (or by `name` where a
route says more, such as the path of a file).

Recorded: everything that changes something, runs something or moves a file's bytes, every
WebSocket, and every failure (logins that failed included). Not recorded: successful reads
that only describe things (lists, info, metrics, events), health checks, and requests that
never named a key and failed for another reason than authentication (stray paths, the docs).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from corral.core.errors import CorralError
from corral.server.logs import REQUEST_ID, SANDBOX_ID

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from corral.core.models import ExecResult
    from corral.server.audit.log import AuditLog

MAX_TEXT = 32 * 1024  # of a command line or code, kept; longer is cut and marked
MAX_NAMES = 64  # of a command's environment variables, kept (names only, each cut at 128)
EXCERPT = 2048  # of a replayed output, shown in its report
_QUIET_PATHS = ("/healthz", "/openapi.json", "/docs", "/redoc")
_SANDBOX_ID = re.compile(r"^sb-[a-z0-9]{1,64}$")


@dataclass
class Call:
    """One request, as the audit log sees it while it runs."""

    at: float
    client: str
    method: str
    path: str
    key_id: str | None = None
    sandbox_id: str | None = None  # one it made (`concerns`); else the one its path names
    operation: str | None = None  # a route's own name for it (`name`)
    detail: dict[str, Any] = field(default_factory=dict)
    status: int | None = None
    error: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    ended: bool = False  # answered: tasks it started that outlive it are on their own
    acted: bool = False  # it started a command or code (recorded as themselves)
    running: set[Action] = field(default_factory=set)  # of those, the ones not ended yet


_CALL: contextvars.ContextVar[Call | None] = contextvars.ContextVar("audit_call", default=None)


def _current() -> Call | None:
    call = _CALL.get()
    return call if call is not None and not call.ended else None


def identify(key_id: str) -> None:
    """The request proved it holds key `key_id`."""
    call = _CALL.get()
    if call is not None:
        call.key_id = key_id


def failed(code: str) -> None:
    """The request is answered with the error `code`."""
    call = _CALL.get()
    if call is not None:
        call.error = code


def concerns(sandbox_id: str) -> None:
    """The request is about sandbox `sandbox_id` (it made it), though its path does not say."""
    call = _CALL.get()
    if call is not None and call.sandbox_id is None and _SANDBOX_ID.match(sandbox_id):
        call.sandbox_id = sandbox_id  # the first it names: a replay's, not its fork's


def name(operation: str, /, **detail: Any) -> None:
    """Record the request as `operation` (instead of its route), with `detail`."""
    call = _CALL.get()
    if call is not None:
        call.operation = operation
        call.detail.update(detail)


def bounded(text: str) -> tuple[str, bool]:
    """`text` cut to what the log keeps, and whether it was cut."""
    if len(text) <= MAX_TEXT:
        return text, False
    return text[:MAX_TEXT], True


def command_detail(
    cmd: str | None,
    argv: Sequence[str] | None,
    env: Mapping[str, str] | None,
    **more: Any,
) -> dict[str, Any]:
    """What the log keeps of a command: its line, the names of its variables (not values)."""
    detail: dict[str, Any] = {k: v for k, v in more.items() if v not in (None, False)}
    if cmd is not None:
        detail["cmd"], cut = bounded(cmd)
    else:
        kept: list[str] = []
        left = MAX_TEXT
        for arg in argv or ():
            kept.append(arg[:left])
            left -= len(kept[-1])
        detail["argv"], cut = kept, left <= 0 and sum(map(len, argv or ())) > MAX_TEXT
    if cut:
        detail["cut"] = True
    if env:
        detail["env"] = env_names(env)
    return detail


def env_names(env: Mapping[str, str] | None) -> list[str]:
    """The names of `env`'s variables, bounded: values are often secrets, and never kept."""
    return sorted(str(name)[:128] for name in env or ())[:MAX_NAMES]


class Action:
    """A command or code run, recorded when it ends (or when its request does, if first)."""

    def __init__(
        self, log: AuditLog, key_id: str, operation: str, sandbox_id: str, detail: dict[str, Any]
    ) -> None:
        self._log = log
        self._key_id = key_id
        self._call = _current()  # None: outside a request (a task a request left running)
        self.operation = operation
        self.sandbox_id = sandbox_id
        self.detail = detail
        self._at = time.time()
        self._start = time.perf_counter()
        self.done = False
        if self._call is not None:
            self._call.acted = True
            self._call.running.add(self)

    def finish(
        self,
        *,
        exit_code: int | None = None,
        error: str | None = None,
        outcome: Mapping[str, Any] | None = None,
    ) -> None:
        """Record how it went (only the first time it is called)."""
        if self.done:
            return
        self.done = True
        call = self._call
        if call is not None:
            call.running.discard(self)
        detail = {**self.detail, **({"outcome": dict(outcome)} if outcome else {})}
        self._log.add({
            "at": self._at, "key_id": self._key_id, "client": call.client if call else "server",
            "request_id": REQUEST_ID.get() if call else None,
            "operation": self.operation, "sandbox_id": self.sandbox_id, "status": None,
            "exit_code": exit_code, "error": error, "bytes_in": 0,
            "bytes_out": sum(int(v) for k, v in (outcome or {}).items() if k.endswith("_bytes")),
            "duration": time.perf_counter() - self._start, "detail": detail,
        })  # fmt: skip

    def failed(self, exc: BaseException) -> None:
        if isinstance(exc, CorralError):
            self.finish(error=exc.code)
        else:  # cancelled: its client went away
            self.finish(
                error="cancelled" if isinstance(exc, asyncio.CancelledError) else "internal_error"
            )


class Digest:
    """The digests of outputs, named `stdout`, `stderr`... (sha256 and length of each), and
    the first bytes of each for a replay's report."""

    def __init__(self, keep: int = 0) -> None:
        self._hashes: dict[str, Any] = {}
        self._sizes: dict[str, int] = {}
        self._kept: dict[str, bytearray] = {}
        self._keep = keep

    def add(self, stream: str, data: bytes) -> None:
        if stream not in self._hashes:
            self._hashes[stream] = hashlib.sha256()
            self._sizes[stream] = 0
            self._kept[stream] = bytearray()
        self._hashes[stream].update(data)
        self._sizes[stream] += len(data)
        kept = self._kept[stream]
        kept += data[: max(self._keep - len(kept), 0)]

    def outcome(self, *streams: str) -> dict[str, Any]:
        empty = hashlib.sha256().hexdigest()
        out: dict[str, Any] = {}
        for stream in streams:
            out[f"{stream}_sha256"] = (
                self._hashes[stream].hexdigest() if stream in self._hashes else empty
            )
            out[f"{stream}_bytes"] = self._sizes.get(stream, 0)
        return out

    def excerpts(self) -> dict[str, str]:
        return {s: bytes(kept).decode(errors="replace") for s, kept in self._kept.items() if kept}


class ExecWatch:
    """Follows a command's output and end (`Process.observe`) into its outcome."""

    def __init__(self, action: Action | None = None, keep: int = 0) -> None:
        self.action = action
        self.digest = Digest(keep)
        self.outcome: dict[str, Any] | None = None
        self.exit_code: int | None = None
        self.stdin_bytes = 0  # how much, never what

    def output(self, stream: str, data: bytes) -> None:
        self.digest.add(stream, data)

    def input(self, size: int) -> None:
        self.stdin_bytes += size

    def ended(self, result: ExecResult | None, error: BaseException | None = None) -> None:
        if result is not None:
            self.exit_code = result.exit_code
            self.outcome = {
                "exit_code": result.exit_code,
                **self.digest.outcome("stdout", "stderr"),
            }
            if result.signal is not None:
                self.outcome["signal"] = result.signal
            if result.timed_out:
                self.outcome["timed_out"] = True
            if self.stdin_bytes:
                self.outcome["stdin_bytes"] = self.stdin_bytes
        if self.action is not None:
            if error is not None:
                self.action.failed(error)
            else:
                self.action.finish(exit_code=self.exit_code, outcome=self.outcome)


class CodeWatch:
    """Follows a code run's events (see `corral.core.code`) into its outcome."""

    def __init__(self, keep: int = 0) -> None:
        self.digest = Digest(keep)
        self.error: str | None = None
        self.ended = False

    def event(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        if kind in ("stdout", "stderr"):
            self.digest.add(str(kind), str(event.get("text", "")).encode())
        elif kind == "result":
            text = (event.get("data") or {}).get("text/plain")
            self.digest.add("results", f"{text}\n".encode())
        elif kind == "error":
            self.error = str(event.get("name"))
        elif kind == "end":
            self.ended = True
            if event.get("timed_out"):
                self.error = self.error or "timed_out"

    def outcome(self) -> dict[str, Any]:
        return {"error": self.error, **self.digest.outcome("stdout", "stderr", "results")}


class AuditRequests:
    """ASGI middleware: records each request (see the module's docstring)."""

    def __init__(self, app: ASGIApp, log: AuditLog) -> None:
        self.app = app
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not self.log.enabled:
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        outer = _current()  # a request the server made to itself, for an MCP tool
        websocket = scope["type"] == "websocket"
        call = Call(
            at=time.time(),
            client=outer.client if outer else str(client[0]) if client else "unknown",
            method="WEBSOCKET" if websocket else str(scope.get("method", "")),
            path=str(scope.get("path", "")),
        )
        token = _CALL.set(call)

        async def counted_receive() -> Message:
            message = await receive()
            call.bytes_in += _size(message, "body" if not websocket else "bytes")
            return message

        async def counted_send(message: Message) -> None:
            kind = message["type"]
            if kind in ("http.response.start", "websocket.http.response.start"):
                call.status = int(message["status"])  # (the second: a WebSocket refused)
            elif kind == "websocket.accept":
                call.status = 101
            elif kind == "websocket.close" and call.status is None:
                call.status = 403  # refused before it was accepted
            call.bytes_out += _size(message, "body" if not websocket else "bytes")
            await send(message)

        try:
            await self.app(scope, counted_receive, counted_send)
        except BaseException:
            call.status = call.status or 500
            call.error = call.error or "internal_error"
            raise
        finally:
            _CALL.reset(token)
            call.ended = True
            self._record(call, scope)

    def _record(self, call: Call, scope: Scope) -> None:
        for action in list(call.running):  # still running when its request ended (detached)
            action.finish(error=call.error or "unfinished")
        # A request that ran something is recorded by what it ran, unless it is named itself.
        if (call.acted and call.operation is None) or not _worth_keeping(call):
            return
        route = getattr(scope.get("route"), "path", None) or call.path
        self.log.add({
            "at": call.at, "key_id": call.key_id, "client": call.client,
            "request_id": REQUEST_ID.get(),
            "operation": _printable(call.operation or f"{call.method} {route}")[:200],
            "sandbox_id": (call.sandbox_id or SANDBOX_ID.get() or _sandbox_param(scope) or "")[:80]
            or None,
            "status": call.status,
            "exit_code": None, "error": call.error, "bytes_in": call.bytes_in,
            "bytes_out": call.bytes_out, "duration": time.time() - call.at, "detail": call.detail,
        })  # fmt: skip


def _printable(text: str) -> str:
    """`text` without control characters (a path is percent-decoded: it may hold any)."""
    return "".join(c if c.isprintable() else "?" for c in text)


def _size(message: Message, key: str) -> int:
    value = message.get(key) or message.get("text") or b""
    return len(value) if isinstance(value, bytes | str) else 0


def _sandbox_param(scope: Scope) -> str | None:
    value = (scope.get("path_params") or {}).get("sandbox_id")
    return value if isinstance(value, str) and _SANDBOX_ID.match(value) else None


def _worth_keeping(call: Call) -> bool:
    if call.path in _QUIET_PATHS:
        return False
    if call.path == "/mcp":  # its tools' calls of the API are recorded themselves
        return (call.status or 500) >= 400
    status = call.status or 500
    if call.key_id is None:
        # A failed login (the 429s of the throttle after it are not), else a stray path.
        return status in (401, 403)
    if call.method in ("GET", "HEAD") and status < 400:
        return call.operation is not None or "/files" in call.path  # bytes leaving
    return True
