"""A client's WebSocket carried to the node that runs its sandbox, over TCP, message by
message (the node checks the key, so a key offered as a subprotocol goes along)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from urllib.parse import urlsplit

from starlette.types import Receive, Scope, Send
from websockets.exceptions import InvalidHandshake, ProtocolError

from corral.server.cluster.proxy import FROM_STORE
from corral.server.previews.sockets import Refused, relay_websocket

CHUNK = 64 * 1024


class TcpStream:
    """One TCP connection as the relay's `Stream`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    async def send(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def receive(self) -> bytes | None:
        return await self._reader.read(CHUNK) or None


async def relay(
    node_url: str, trust: ssl.SSLContext, scope: Scope, receive: Receive, send: Send
) -> None:
    """Relay the WebSocket of `scope` to the same path on the node at `node_url` (over TLS,
    trusting `trust`, for an https:// one)."""
    if (await receive())["type"] != "websocket.connect":
        return
    where = urlsplit(node_url)
    query = scope.get("query_string", b"").decode("latin-1")
    target = scope["path"] + (f"?{query}" if query else "")
    try:
        reader, writer = await asyncio.open_connection(
            where.hostname, where.port, ssl=trust if where.scheme == "https" else None
        )
    except OSError:
        await send({"type": "websocket.close", "code": 1013, "reason": "node unavailable"})
        return
    try:
        await relay_websocket(
            TcpStream(reader, writer), scope, receive, send,
            # `X-Corral-From-Store` is the front's to say, never a client's.
            target=target, headers=[h for h in scope["headers"] if h[0] != FROM_STORE.encode()],
            keep_key=True,
        )  # fmt: skip
    except (Refused, InvalidHandshake, ProtocolError) as refused:
        # The node refused the handshake (unknown sandbox, bad key): said as a close.
        with contextlib.suppress(Exception):
            await send({"type": "websocket.close", "code": 1008, "reason": str(refused)[:120]})
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
