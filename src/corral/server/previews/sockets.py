"""A WebSocket relayed to a port in a sandbox: the client's side is the ASGI server's, the
sandbox's side is spoken with `websockets`' sans-I/O client over a port connection through
the sandbox's agent. Messages pass whole, each way; pings are answered on each side."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

from starlette.types import Receive, Scope, Send
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

from corral.server.auth import KEY_PROTOCOL
from corral.server.previews.proxy import Headers

MAX_MESSAGE = 16 * 1024 * 1024
# Set by the WebSocket handshake itself, on each side: not copied from the client's request.
HANDSHAKE = frozenset(
    {
        b"host",
        b"upgrade",
        b"connection",
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
        b"sec-websocket-accept",
    }
)


class Refused(Exception):
    """The sandbox's server did not accept the WebSocket."""


class Stream(Protocol):
    """Bytes each way: a port connection through a sandbox's agent, or a TCP connection."""

    async def send(self, data: bytes) -> None: ...

    async def receive(self) -> bytes | None: ...


async def relay_websocket(
    stream: Stream,
    scope: Scope,
    receive: Receive,
    send: Send,
    *,
    target: str,
    headers: Headers,
    keep_key: bool = False,
) -> None:
    """Open the WebSocket at the far end, accept the client's, then relay until either closes.
    Raises `Refused` (the client's is not accepted yet) if the far end says no. A Corral key
    offered as a subprotocol is dropped unless `keep_key` (the far end is a Corral node)."""
    host = dict(scope["headers"]).get(b"host", b"sandbox").decode("latin-1")
    protocol = ClientProtocol(
        parse_uri(f"ws://{host}{target}"),
        # A Corral key offered as a subprotocol is the caller's, never the sandbox's to see.
        subprotocols=[
            offered
            for offered in scope.get("subprotocols") or ()
            if keep_key or not offered.startswith(KEY_PROTOCOL)
        ]
        or None,
        max_size=MAX_MESSAGE,
    )
    request = protocol.connect()
    for name, value in headers:
        if name not in HANDSHAKE:
            request.headers[name.decode("latin-1")] = value.decode("latin-1")
    protocol.send_request(request)
    await _flush(stream, protocol)
    await _handshake(stream, protocol)
    await send({"type": "websocket.accept", "subprotocol": protocol.subprotocol})
    inbound = asyncio.create_task(_from_client(stream, protocol, receive))
    try:
        await _from_sandbox(stream, protocol, send)
    finally:
        inbound.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await inbound


async def _flush(stream: Stream, protocol: ClientProtocol) -> None:
    for data in protocol.data_to_send():
        if data:
            await stream.send(data)


async def _handshake(stream: Stream, protocol: ClientProtocol) -> None:
    while protocol.state is State.CONNECTING:
        data = await stream.receive()
        if data is None:
            raise Refused("the server in the sandbox closed the connection")
        protocol.receive_data(data)
        for event in protocol.events_received():
            if isinstance(event, Response) and event.status_code != 101:
                raise Refused(f"the server in the sandbox answered {event.status_code}")
    if protocol.state is not State.OPEN:
        raise Refused("the server in the sandbox did not accept the WebSocket")


async def _from_client(stream: Stream, protocol: ClientProtocol, receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "websocket.receive":
            if message.get("text") is not None:
                protocol.send_text(message["text"].encode())
            elif message.get("bytes") is not None:
                protocol.send_binary(message["bytes"])
        elif message["type"] == "websocket.disconnect":
            with contextlib.suppress(Exception):
                protocol.send_close(int(message.get("code") or 1000))
            await _flush(stream, protocol)
            return
        await _flush(stream, protocol)


async def _from_sandbox(stream: Stream, protocol: ClientProtocol, send: Send) -> None:
    pending: tuple[Opcode, bytearray] | None = None  # a message arriving in fragments
    while protocol.state is not State.CLOSED:
        data = await stream.receive()
        if data is None:
            protocol.receive_eof()
        else:
            protocol.receive_data(data)
        for event in protocol.events_received():
            if not isinstance(event, Frame):
                continue
            if event.opcode is Opcode.CLOSE:
                code = protocol.close_code or 1000
                await send({"type": "websocket.close", "code": code})
                return
            if event.opcode in (Opcode.TEXT, Opcode.BINARY):
                pending = (event.opcode, bytearray(event.data))
            elif event.opcode is Opcode.CONT and pending is not None:
                pending[1].extend(event.data)
            else:
                continue  # pings are answered by the protocol
            if event.fin and pending is not None:
                kind, body = pending
                pending = None
                if kind is Opcode.TEXT:
                    await send({"type": "websocket.send", "text": body.decode()})
                else:
                    await send({"type": "websocket.send", "bytes": bytes(body)})
        await _flush(stream, protocol)
        if data is None:
            break
    await send({"type": "websocket.close", "code": protocol.close_code or 1006})
