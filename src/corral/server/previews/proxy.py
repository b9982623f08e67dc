"""One HTTP request relayed to a port in a sandbox: HTTP/1.1 spoken with h11 over a
`PortStream` (the sandbox's agent carries the bytes), both bodies streamed as they come, so
uploads of any size and Server-Sent Events pass through; a client that goes away closes the
connection in the sandbox."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

import h11
from starlette.types import Message, Receive, Scope, Send

from corral.engine.ports import PortStream
from corral.server.metrics import PREVIEW_BYTES

# Headers that describe one connection, not the message (RFC 9110 7.6.1): never forwarded.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"upgrade",
    }
)
Headers = list[tuple[bytes, bytes]]


class ClientGone(Exception):
    """The HTTP client disconnected."""


async def relay(
    stream: PortStream,
    scope: Scope,
    receive: Receive,
    send: Send,
    *,
    target: bytes,
    headers: Headers,
) -> None:
    """Send the request (`target`, `headers`, the body from `receive`) and the response back
    to `send`. Raises `h11.ProtocolError` for a sandbox's server that does not speak HTTP/1.1
    before the response has started."""
    connection = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method=scope["method"], target=target, headers=[*headers, (b"connection", b"close")]
    )
    await stream.send(connection.send(request))
    uploading = asyncio.create_task(_upload(stream, connection, receive))
    try:
        await _download(stream, connection, send, uploading)
    finally:
        uploading.cancel()
        with contextlib.suppress(asyncio.CancelledError, ClientGone, Exception):
            await uploading


async def _upload(stream: PortStream, connection: h11.Connection, receive: Receive) -> None:
    """The request's body, then wait for the client to go away (raising `ClientGone`)."""
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        if message["type"] != "http.request":
            continue
        body = message.get("body", b"")
        if body and connection.our_state is h11.SEND_BODY:
            PREVIEW_BYTES.labels("in").inc(len(body))
            await stream.send(connection.send(h11.Data(data=body)))
        if not message.get("more_body", False):
            if connection.our_state is h11.SEND_BODY:
                await stream.send(connection.send(h11.EndOfMessage()))
            break
    while (await receive())["type"] != "http.disconnect":
        pass
    raise ClientGone


async def _download(
    stream: PortStream, connection: h11.Connection, send: Send, uploading: asyncio.Task[None]
) -> None:
    started = False
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            data = await _next(stream, uploading)
            connection.receive_data(data or b"")
            continue
        if isinstance(event, h11.Response):
            await send(
                {
                    "type": "http.response.start",
                    "status": event.status_code,
                    "headers": list(forwardable(event.headers)),
                }
            )
            started = True
        elif isinstance(event, h11.Data):
            PREVIEW_BYTES.labels("out").inc(len(event.data))
            await send({"type": "http.response.body", "body": bytes(event.data), "more_body": True})
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            if started:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            return


async def _next(stream: PortStream, uploading: asyncio.Task[None]) -> bytes | None:
    """The next bytes of the response; `ClientGone` if the client left first."""
    reading = asyncio.ensure_future(stream.receive())
    await asyncio.wait({reading, uploading}, return_when=asyncio.FIRST_COMPLETED)
    if reading.done():
        return reading.result()
    reading.cancel()
    uploading.result()  # ClientGone, or the upload's own error
    return await stream.receive()  # the body is sent: wait for the answer


def forwardable(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """`headers` without those of one connection (and the body's framing, which the server
    on our side sets again)."""
    return [
        (name.lower(), value)
        for name, value in headers
        if name.lower() not in HOP_BY_HOP and name.lower() != b"transfer-encoding"
    ]
