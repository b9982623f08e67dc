"""TCP connections to ports inside the sandbox, relayed over one agent stream each: how
previews and port forwarding reach a server in a sandbox without any network between the host
and the sandbox (so also for sandboxes with no network at all, under every runtime).

    CALL port.connect {"port": int, "half_close": bool}
    EVENT {"type": "connected"}             the connection to 127.0.0.1:port is open
    FILE  either way                        the connection's bytes, under the stream's credit
    EOF   host -> guest                     the host's side is done: shut down our writing
                                            side if half_close, else ignored (HTTP servers
                                            may hang up on a half-closed connection)
    CANCEL                                  close the connection
    REPLY {"sent": int, "received": int}    once the sandbox's side has closed, or on CANCEL

Nothing listening is the error `port_closed`.
"""

from __future__ import annotations

TYPE_CHECKING = False  # `typing` is for annotations only: 2 ms of every agent's start (aio)
if TYPE_CHECKING:
    from typing import Any, Dict

try:
    from corral.agent import aio, aiostreams
    from corral.agent import protocol as P
    from corral.agent.fileops import GuestError
except ImportError:  # inside the sandbox the agent directory itself is on sys.path
    import aio  # type: ignore[import-not-found,no-redef]
    import aiostreams  # type: ignore[import-not-found,no-redef]
    import protocol as P  # type: ignore[import-not-found,no-redef]
    from fileops import GuestError  # type: ignore[import-not-found,no-redef]

CONNECT_TIMEOUT = 10.0
CANCEL_CHECK = 0.5  # seconds between looks for the host's CANCEL while the port reads nothing
CLOSE_GRACE = 2.0  # seconds a closed relay's unsent bytes have to reach the port


async def port_connect(stream: Any, params: Dict[str, Any]) -> Dict[str, Any]:
    port = params.get("port")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise GuestError("invalid_request", "port must be a whole number from 1 to 65535")
    try:
        reader, writer = await aio.wait_for(
            aiostreams.open_connection("127.0.0.1", port), CONNECT_TIMEOUT
        )
    except (OSError, TimeoutError) as exc:
        reason = getattr(exc, "strerror", None) or "no answer"
        message = "nothing answers on port %d in the sandbox (%s)" % (port, reason)
        raise GuestError("port_closed", message) from None
    counts = {"sent": 0, "received": 0}
    try:
        await stream.event({"type": "connected"})
        inbound = aio.ensure_future(
            _inbound(stream, writer, bool(params.get("half_close")), counts)
        )
        try:
            while not stream.cancelled and not stream.detached:
                data = await _read(reader, inbound)
                if not data:
                    break
                counts["received"] += len(data)
                await stream.send_data(P.FILE, data)
        finally:
            inbound.cancel()
    finally:  # what the port has not taken CLOSE_GRACE later is dropped
        writer.close(CLOSE_GRACE)
    return counts


async def _read(reader: aiostreams.StreamReader, inbound: "aio.Future[Any]") -> bytes:
    """The next bytes from the port, or b"" once the host cancels (`inbound` ends)."""
    reading: "aio.Future[Any]" = aio.ensure_future(reader.read(P.CHUNK))
    done, _ = await aio.wait({reading, inbound}, return_when=aio.FIRST_COMPLETED)
    if reading in done:
        try:
            return bytes(reading.result())
        except OSError:
            return b""
    reading.cancel()
    return b""


async def _inbound(
    stream: Any, writer: aiostreams.StreamWriter, half_close: bool, counts: Dict[str, int]
) -> None:
    """The host's bytes to the port, until CANCEL (or EOF, which shuts down our side of the
    connection if `half_close`)."""
    while True:
        chunk = await stream.read_input()
        if chunk is None:
            if stream.cancelled:
                return
            if half_close and writer.can_write_eof():
                writer.write_eof()
            while not stream.cancelled:  # the port may still answer: wait for the CANCEL
                if await stream.incoming.get() is None and stream.cancelled:
                    return
            return
        counts["sent"] += len(chunk)
        writer.write(chunk)
        if not await _drained(stream, writer):
            return


async def _drained(stream: Any, writer: aiostreams.StreamWriter) -> bool:
    """Wait until the port has taken enough of what was written; False if it has not within
    CANCEL_CHECK and the host has ended the stream: a port that never reads must not hold
    the relay for ever (one that reads gets what the host sent before its CANCEL)."""
    draining = aio.ensure_future(writer.drain())
    while True:
        await aio.wait({draining}, timeout=CANCEL_CHECK)
        if draining.done():
            draining.result()  # the connection broken: the relay ends
            return True
        if stream.cancelled:
            draining.cancel()
            return False
