"""The SDK's fast lane: whole requests and responses (JSON or bytes) over HTTP/1.1 keep-alive
connections on asyncio streams.

httpx spends about 0.5 ms of CPU on each request here (httpcore, anyio and h11 between the
call and the socket), a quarter of a command's whole round trip; this lane spends a tenth of
that (docs/performance.md). It carries what a request/response call needs and nothing else:
streamed bodies, HEAD, an in-process app and servers behind a proxy go through httpx
(`corral.client._transport` decides).
"""

from __future__ import annotations

import asyncio
import contextlib
import json as jsonlib
import select
import ssl
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

CONNECT_TIMEOUT = 10.0
# Seconds an idle connection is kept: less than any server keeps one (uvicorn's default is
# 5 s), so a request never meets the server closing it (docs/performance.md, "Bursts").
KEEP_IDLE = 4.0
MAX_CONNECTIONS = 100  # at once, as httpx's pool: more requests wait for one to be free
CLOSE_WAIT = 1.0  # seconds a closing client waits for its connections to close
RETRY_BACKOFF = 0.5  # seconds before the second retry of a connect; doubled for each next
MAX_HEAD = 64 * 1024  # the status line and headers of one response
JOIN_BELOW = 64 * 1024  # a body up to this size is sent in one write with the request's head
# A larger one waits for the server's `100 Continue` (the server may refuse it from the head
# alone, and an answer to a body it never reads is lost to a reset), or this many seconds.
CONTINUE_WAIT = 1.0
# Sent again on a fresh connection if a kept one fails: no effect to repeat (a PUT may append,
# a DELETE answers not-found the second time).
RETRY_SAFE = frozenset(("GET",))


class Failed(OSError):
    """The request got no complete answer; the connection was dropped."""


class Answer:
    """A response: its status, headers (names in lower case) and whole body."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status_code = status
        self.headers = headers
        self.content = body

    def json(self) -> Any:
        return jsonlib.loads(self.content)


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Lane:
    """Keep-alive connections to one server, each carrying one request at a time."""

    def __init__(
        self,
        url: str,
        headers: Mapping[str, str],
        timeout: float,
        tls: ssl.SSLContext | None,
        retries: int,
    ) -> None:
        """`retries`: how many times a connection that could not be made is tried again."""
        parts = urlsplit(url)
        self._host = parts.hostname or "localhost"
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._prefix = parts.path.rstrip("/")
        self._tls = tls
        self._timeout = timeout
        self._retries = retries
        host = parts.netloc.rpartition("@")[2]
        fixed = {"Host": host, "User-Agent": "corral-python", "Accept": "*/*", **headers}
        self._head = "".join(f"{name}: {value}\r\n" for name, value in fixed.items())
        self._idle: list[tuple[Connection, float]] = []  # and since when, newest last
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)
        self._closed = False  # then connections are closed after their answer, never kept

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        params: Mapping[str, Any] | list[tuple[str, Any]] | None = None,
    ) -> Answer:
        """Send one request (a JSON body, or bytes, or none) and read its whole answer."""
        body = content
        if json is not None:
            body = jsonlib.dumps(json, separators=(",", ":"), allow_nan=False).encode()
        target = quote(self._prefix + path, safe="/:@!$&'()*+,;=-._~%")
        if params:
            target += "?" + query(params)
        head = f"{method} {target} HTTP/1.1\r\n{self._head}"
        if json is not None:
            head += "Content-Type: application/json\r\n"
        if body is not None or method in ("POST", "PUT", "PATCH"):
            head += f"Content-Length: {len(body or b'')}\r\n"
        if body and len(body) > JOIN_BELOW:
            head += "Expect: 100-continue\r\n"
            message = [(head + "\r\n").encode("latin-1"), body]  # not copied into one
        else:  # one write: the server reads the request at once
            message = [(head + "\r\n").encode("latin-1") + (body or b"")]
        async with self._slots:
            return await self._send(message, method)

    async def _send(self, message: list[bytes], method: str) -> Answer:
        while True:
            connection, reused = await self._take()
            try:
                answer, keep = await self._exchange(connection, message, method)
            except Failed:
                connection[1].close()
                if reused and method in RETRY_SAFE:
                    continue  # closed by the server while idle: nothing was done
                raise
            except BaseException:
                connection[1].close()
                raise
            now = time.monotonic()
            while self._idle and now - self._idle[0][1] >= KEEP_IDLE:  # the oldest, gone stale
                self._idle.pop(0)[0][1].close()
            if keep and not self._closed:
                self._idle.append((connection, now))
            else:
                connection[1].close()
            return answer

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = [connection for connection, _ in self._idle], []
        for _, writer in idle:
            writer.close()
        # Closed for good before the loop may end (else Python warns of unclosed transports);
        # a TLS peer that does not answer the close is not waited for long.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_WAIT):
                await asyncio.gather(*(w.wait_closed() for _, w in idle), return_exceptions=True)

    async def _take(self) -> tuple[Connection, bool]:
        """An idle connection the server has not closed, or a new one."""
        while self._idle:
            (reader, writer), since = self._idle.pop()
            fresh = time.monotonic() - since < KEEP_IDLE
            sock = writer.get_extra_info("socket")
            if fresh and not writer.is_closing() and not reader.at_eof() and not _readable(sock):
                return (reader, writer), True
            writer.close()  # kept too long, or with something to read: closed (or broken)
        for attempt in range(self._retries + 1):
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    made = await asyncio.open_connection(
                        self._host,
                        self._port,
                        ssl=self._tls,
                        server_hostname=self._host if self._tls else None,
                        limit=MAX_HEAD,
                    )
                break
            except ssl.SSLError:
                raise  # a certificate not trusted now is not trusted a moment later
            except OSError:  # refused, unreachable, or TimeoutError: nothing was sent
                if attempt == self._retries:
                    raise
                await asyncio.sleep(RETRY_BACKOFF * 2 ** (attempt - 1) if attempt else 0)
        return made, False

    async def _exchange(
        self, connection: Connection, message: list[bytes], method: str
    ) -> tuple[Answer, bool]:
        """Send `message` and read the whole answer; whether the connection may be reused."""
        reader, writer = connection
        headers: dict[str, str]
        head, *rest = message
        status, headers = 100, {}  # until the answer's head is read
        unsent = False
        try:
            async with asyncio.timeout(self._timeout):
                writer.write(head)
                await writer.drain()
                if rest:  # asked for `100 Continue`: the answer may come instead
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(CONTINUE_WAIT):
                            status, headers = parse_head(await reader.readuntil(b"\r\n\r\n"))
                    unsent = status >= 200  # answered from the head alone
                    if not unsent:  # to go on, or no word in time: the body follows
                        for part in rest:
                            writer.write(part)
                            await writer.drain()
                while 100 <= status < 200:  # an interim answer (100, 103) precedes the real one
                    status, headers = parse_head(await reader.readuntil(b"\r\n\r\n"))
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            raise Failed(f"the server closed the connection: {exc}") from exc
        except asyncio.LimitOverrunError as exc:
            raise OSError("the server's response headers are too large") from exc
        empty = method == "HEAD" or status in (204, 304)  # framed by definition: no body
        async with asyncio.timeout(self._timeout):
            try:
                body = await read_body(reader, headers, empty)
            except (
                ConnectionError,
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
                ValueError,
            ) as exc:
                raise OSError(f"the server's response was cut short: {exc}") from exc
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        framed = empty or chunked or "content-length" in headers
        keep = framed and headers.get("connection", "").lower() != "close"
        keep = keep and not unsent  # a body declared and never sent: the connection is done
        return Answer(status, headers, body), keep


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise OSError(f"not an HTTP/1.1 response: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    return int(code), headers


async def read_body(reader: asyncio.StreamReader, headers: dict[str, str], empty: bool) -> bytes:
    if empty:
        return b""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        chunks: list[bytes] = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailers, read so the next answer starts where it should
                return b"".join(chunks)
            chunk = await reader.readexactly(size + 2)
            chunks.append(chunk[:-2])
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    return await reader.read()  # until the server closes the connection


def query(params: Mapping[str, Any] | list[tuple[str, Any]]) -> str:
    """Query parameters as httpx writes them: True as "true", None as "", a list as repeats."""
    items = params.items() if isinstance(params, Mapping) else params
    pairs = []
    for name, value in items:
        for one in value if isinstance(value, list | tuple) else [value]:
            pairs.append((name, _text(one)))
    return urlencode(pairs)


def _text(value: Any) -> str:
    if value is True or value is False:
        return "true" if value else "false"
    return "" if value is None else str(value)


def _readable(sock: Any) -> bool:
    """Whether an idle socket has something to read: the server closed it (or broke it)."""
    try:
        fd = sock.fileno()
        if hasattr(select, "poll"):  # any descriptor number, unlike select()
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            return bool(poller.poll(0))
        ready, _, _ = select.select([fd], [], [], 0)
    except (AttributeError, OSError, ValueError):
        return True
    return bool(ready)
