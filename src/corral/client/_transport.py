"""The SDK's wire: HTTP (whole requests on the SDK's own lane, `_http1`; streams on httpx) and
WebSockets (websockets), with their errors turned into Corral's at this boundary.

Loaded on a client's first request, not by `import corral`: httpx alone takes longer to import
than the rest of the SDK together, and a program that imports Corral without calling it (or
before it does) should not pay for it.
"""

from __future__ import annotations

import json
import ssl
import urllib.request
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from corral.client._http1 import Lane
from corral.core.errors import ConnectionFailed, CorralError, InvalidRequest, from_response


class Socket:
    """A WebSocket to the server; a closed one raises `ConnectionFailed` or ends iteration."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws

    async def send(self, message: str | bytes) -> None:
        try:
            await self._ws.send(message)
        except ConnectionClosed as exc:
            raise ConnectionFailed(f"the stream is closed: {exc}") from exc

    async def recv(self) -> str | bytes:
        try:
            return await self._ws.recv()
        except ConnectionClosed as exc:
            raise ConnectionFailed(f"the server closed the stream: {exc}") from exc

    async def messages(self) -> AsyncIterator[str | bytes]:
        """Every message until the socket closes, however it closes."""
        try:
            async for message in self._ws:
                yield message
        except ConnectionClosed:
            return

    async def close(self) -> None:
        await self._ws.close()


CONNECT_RETRIES = 3  # of a connection that could not be made (nothing was sent)


class Transport:
    """One server's HTTP connection pool and WebSockets, with one API key."""

    def __init__(
        self,
        url: str,
        api_key: str | None,
        timeout: float,
        *,
        ca: str | None,
        verify: bool,
        app: Any = None,
    ) -> None:
        self.url = url
        if api_key and any(c in api_key for c in "\r\n\0"):
            raise InvalidRequest(
                "the API key holds a line break: set CORRAL_API_KEY (or api_key=) to the key "
                "alone, without the newline a file or secret may end with",
                code="invalid_api_key",
            )
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._tls = tls_context(ca, verify) if url.lower().startswith("https:") else None
        # A connection that could not be made sent nothing, so it is tried again: on a busy
        # machine (a burst of gVisor starts) a connect can take longer than its timeout.
        sockets = httpx.AsyncHTTPTransport(verify=self._tls or True, retries=CONNECT_RETRIES)
        self._http = httpx.AsyncClient(
            base_url=url,
            headers=self._headers,
            timeout=httpx.Timeout(timeout, connect=10.0),
            # An ASGI app in this process (a server's own tools): no socket, no TLS.
            transport=httpx.ASGITransport(app=app) if app is not None else sockets,
        )
        self._sockets: weakref.WeakSet[Socket] = weakref.WeakSet()
        # Whole requests take the fast lane, but not through a proxy (httpx honours the
        # environment's) nor to an app in this process.
        proxies = [kind for kind in urllib.request.getproxies() if kind != "no"]
        self._direct = app is None and not proxies
        self._lane = (
            Lane(url, self._headers, timeout, self._tls, CONNECT_RETRIES) if self._direct else None
        )

    async def aclose(self) -> None:
        for socket in list(self._sockets):
            await socket.close()
        if self._lane is not None:
            await self._lane.aclose()
        await self._http.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | list[tuple[str, Any]] | None = None,
        content: bytes | AsyncIterable[bytes] | None = None,
    ) -> Any:
        response: Any
        try:
            if self._lane is not None and not isinstance(content, AsyncIterable):
                response = await self._lane.request(
                    method, path, json=json, content=content, params=params
                )
            else:
                response = await self._http.request(
                    method, path, json=json, params=params, content=content
                )
        except (httpx.TransportError, OSError) as exc:
            raise self.unreachable(exc) from exc
        if response.status_code >= 400:
            raise _error(response.status_code, response.content, response.headers)
        return response.json() if response.content else None

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
    ) -> AsyncIterator[httpx.Response]:
        try:
            async with self._http.stream(
                method, path, params=params, json=json, timeout=httpx.Timeout(None, connect=10.0)
            ) as response:
                if response.status_code >= 400:
                    raise _error(response.status_code, await response.aread(), response.headers)
                yield response
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from exc

    async def exists(self, path: str) -> bool:
        """Whether HEAD `path` finds something (200) rather than nothing (404)."""
        try:
            response = await self._http.head(path)
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from exc
        if response.status_code not in (200, 404):
            raise _error(response.status_code, b"", response.headers)
        return response.status_code == 200

    async def websocket(self, path: str) -> Socket:
        url = "ws" + self.url[len("http") :] + path  # http: -> ws:, https: -> wss:
        try:
            ws = await connect(
                url,
                additional_headers=self._headers,
                max_size=None,  # the agent's chunks are bounded; frames are never huge
                open_timeout=10,
                ssl=self._tls,
                # True: as the environment says, read at every connect (0.1 ms each time)
                proxy=None if self._direct else True,
            )
        except InvalidStatus as exc:  # refused with an answer: the server's error
            answer = exc.response
            raise _error(answer.status_code, bytes(answer.body or b""), answer.headers) from None
        except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
            raise self.unreachable(exc) from exc
        socket = Socket(ws)
        self._sockets.add(socket)
        return socket

    def unreachable(self, exc: Exception) -> CorralError:
        if _untrusted(exc):
            return ConnectionFailed(
                f"the Corral server at {self.url} has a TLS certificate this client does not "
                f"trust ({exc}): set CORRAL_CA (or ca=) to the CA file `corral serve` printed, "
                "or, only if you accept anyone in between reading your key, verify=False"
            )
        return ConnectionFailed(
            f"cannot reach the Corral server at {self.url} ({type(exc).__name__}: {exc}); "
            "is `corral serve` running, and is CORRAL_URL right?"
        )


def tls_context(ca: str | None, verify: bool) -> ssl.SSLContext:
    """The client's TLS: the CA in `ca` only if given, else the system's; verified unless
    `verify` is False."""
    try:
        context = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidRequest(
            f"cannot use {ca} as the Corral server's CA (CORRAL_CA or ca=): {exc}",
            code="invalid_tls",
        ) from exc
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _untrusted(exc: BaseException | None) -> bool:
    """Whether `exc`, or what caused it, is a failed certificate check."""
    while exc is not None:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _error(status: int, body: bytes, headers: Mapping[str, str]) -> CorralError:
    try:
        error = json.loads(body)["error"]
        made = from_response(status, str(error["code"]), str(error["message"]))
    except (ValueError, KeyError, TypeError):
        text = body.decode(errors="replace")[:500]
        made = from_response(status, "http_error", f"HTTP {status}: {text}")
    retry_after = headers.get("retry-after", "")
    if retry_after.isdigit():
        made.retry_after = int(retry_after)
    return made
