"""The SDK's connection to the server: a connection that could not be made sent nothing, so it
is made again (a busy machine can take longer than the connect timeout, as a burst of 100
gVisor starts on two cores did in bench/run.py --only load); an answer that never came is not
asked again, since the server may have acted on it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket

import pytest

from corral.client import _http1
from corral.client._transport import Transport
from corral.core.errors import ConnectionFailed, CorralError, InvalidRequest

ANSWER = (
    b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok": 1}\r\n'
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_a_connection_refused_at_first_is_made_again() -> None:
    port = free_port()
    asked: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        asked.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(ANSWER)
        await writer.drain()
        writer.close()

    async def listen_later() -> asyncio.Server:
        await asyncio.sleep(0.2)  # the first connect is refused: nothing listens yet
        return await asyncio.start_server(serve, "127.0.0.1", port)

    transport = Transport(f"http://127.0.0.1:{port}", "corral_key", 30, ca=None, verify=True)
    later = asyncio.create_task(listen_later())
    try:
        assert await asyncio.wait_for(transport.request("GET", "/healthz"), 30) == {"ok": 1}
    finally:
        (await later).close()
        await transport.aclose()
    assert len(asked) == 1 and asked[0].startswith(b"GET /healthz ")


async def test_nobody_listening_at_all_still_says_so() -> None:
    transport = Transport(f"http://127.0.0.1:{free_port()}", None, 30, ca=None, verify=True)
    try:
        with pytest.raises(ConnectionFailed) as failed:
            await asyncio.wait_for(transport.request("GET", "/healthz"), 30)
    finally:
        await transport.aclose()
    assert "is `corral serve` running" in str(failed.value)


async def test_a_request_sent_and_not_answered_is_not_sent_again() -> None:
    asked: list[bytes] = []

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        asked.append(await reader.readuntil(b"\r\n\r\n"))
        writer.close()  # no answer: the server may have acted on it

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = Transport(f"http://127.0.0.1:{port}", None, 30, ca=None, verify=True)
    try:
        with pytest.raises(ConnectionFailed):
            await asyncio.wait_for(transport.request("POST", "/v1/sandboxes", json={}), 30)
    finally:
        server.close()
        await transport.aclose()
    assert len(asked) == 1


# -- the fast lane (corral.client._http1): whole requests on keep-alive connections ----------


HANG_UP = b""  # as a Recorder's answer: read the request, then close without answering


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the machine's environment, these tests talk to their servers directly."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


class Recorder:
    """A small HTTP/1.1 server that answers each request with the next canned answer (or
    `ANSWER`), keeps what it was asked, and counts its connections."""

    def __init__(self, *answers: bytes, close_after: bool = False, continues: bool = True) -> None:
        self.answers = list(answers)
        self.continues = continues  # answers `Expect: 100-continue` (as uvicorn does)
        self.asked: list[bytes] = []
        self.connections = 0
        self.close_after = close_after
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if self.continues and b"\r\nExpect: 100-continue\r\n" in head:
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                self.asked.append(head + await reader.readexactly(length))
                answer = self.answers.pop(0) if self.answers else ANSWER
                if answer == HANG_UP:
                    break
                writer.write(answer)
                await writer.drain()
                if self.close_after or b"Connection: close" in answer:
                    break
        except asyncio.IncompleteReadError:
            pass
        writer.close()

    async def __aenter__(self) -> Transport:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.transport = Transport(f"http://127.0.0.1:{port}", "k", 30, ca=None, verify=True)
        return self.transport

    async def __aexit__(self, *exc: object) -> None:
        await self.transport.aclose()
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for w in self.writers), return_exceptions=True)


async def test_requests_share_one_kept_alive_connection() -> None:
    recorder = Recorder()
    async with recorder as transport:
        assert transport._lane is not None  # the lane, not httpx, carries them
        for _ in range(3):
            assert await transport.request("POST", "/v1/x", json={"a": [1, "é"]}) == {"ok": 1}
    assert recorder.connections == 1 and len(recorder.asked) == 3


async def test_the_lane_sends_what_httpx_would() -> None:
    recorder = Recorder()
    async with recorder as transport:
        await transport.request("POST", "/v1/sandboxes/sb_1/exec", json={"argv": ["true"]})
        await transport.request("GET", "/v1/files", params={"path": "/a b", "all": True, "n": None})
        await transport.request("PUT", "/v1/files/content", content=b"\x00raw")
        await transport.request("GET", "/v1/images/a b")
    assert recorder.connections == 1
    post, get, put, spaced = recorder.asked
    assert post.startswith(b"POST /v1/sandboxes/sb_1/exec HTTP/1.1\r\n")
    assert b"\r\nAuthorization: Bearer k\r\n" in post
    assert b"\r\nContent-Type: application/json\r\n" in post
    assert post.endswith(b'\r\n\r\n{"argv":["true"]}')
    assert get.startswith(b"GET /v1/files?path=%2Fa+b&all=true&n= HTTP/1.1\r\n")
    assert b"Content-Length" not in get and b"Content-Type" not in put
    assert put.endswith(b"\r\nContent-Length: 4\r\n\r\n\x00raw")
    assert spaced.startswith(b"GET /v1/images/a%20b HTTP/1.1\r\n")


async def test_a_connection_the_server_closed_while_idle_is_not_used() -> None:
    recorder = Recorder(close_after=True)
    async with recorder as transport:
        for method in ("GET", "POST", "GET"):
            assert await transport.request(method, "/v1/x") == {"ok": 1}
            await asyncio.sleep(0.05)  # the server's close arrives while the connection idles
    assert recorder.connections == 3 and len(recorder.asked) == 3


async def test_chunked_and_unframed_answers_are_read_whole() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'4\r\n{"ok\r\n6;x=1\r\n": [1]\r\n1\r\n}\r\n0\r\n\r\n'
    )
    unframed = b'HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{"ok": 2}'
    recorder = Recorder(chunked, unframed)
    async with recorder as transport:
        assert await transport.request("GET", "/a") == {"ok": [1]}
        assert await transport.request("GET", "/b") == {"ok": 2}
        assert await transport.request("GET", "/c") == {"ok": 1}
    assert recorder.connections == 2  # the unframed answer ended its connection


async def test_an_error_answer_is_corrals_error_with_its_retry_after() -> None:
    body = b'{"error": {"code": "too_many_sandboxes", "message": "terminate some"}}'
    refused = (
        b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    async with Recorder(refused) as transport:
        with pytest.raises(CorralError) as refusal:
            await transport.request("POST", "/v1/sandboxes", json={})
        assert await transport.request("GET", "/v1/x") == {"ok": 1}  # the connection lives on
    assert refusal.value.code == "too_many_sandboxes" and refusal.value.retry_after == 7


async def test_an_answer_cut_short_fails_and_is_not_asked_again() -> None:
    cut = b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"ok"'
    recorder = Recorder(cut, close_after=True)
    async with recorder as transport:
        with pytest.raises(ConnectionFailed):
            await transport.request("GET", "/v1/x")
    assert len(recorder.asked) == 1


def test_a_proxy_in_the_environment_leaves_requests_to_httpx(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert Transport("https://corral.invalid", "k", 30, ca=None, verify=True)._lane is None
    monkeypatch.delenv("HTTPS_PROXY")
    assert Transport("https://corral.invalid", "k", 30, ca=None, verify=True)._lane is not None


async def test_a_connection_idle_too_long_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_http1, "KEEP_IDLE", 0.1)  # the server could be closing it right now
    recorder = Recorder()
    async with recorder as transport:
        await transport.request("POST", "/v1/x", json={})
        await transport.request("POST", "/v1/x", json={})
        await asyncio.sleep(0.2)
        await transport.request("POST", "/v1/x", json={})
    assert recorder.connections == 2 and len(recorder.asked) == 3


@pytest.mark.parametrize("continues", [True, False], ids=["100-continue", "no-word"])
async def test_a_large_body_arrives_whole(continues: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large body waits for the server's `100 Continue`, or, from a server that says
    nothing, a moment (`CONTINUE_WAIT`); a small one goes with its head."""
    monkeypatch.setattr(_http1, "CONTINUE_WAIT", 0.2)
    body = bytes(range(256)) * 4096  # 1 MiB, written after the head rather than joined to it
    recorder = Recorder(continues=continues)
    async with recorder as transport:
        await transport.request("PUT", "/v1/files/content", content=body)
        await transport.request("PUT", "/v1/files/content", content=b"small")
    big, small = recorder.asked
    assert big.endswith(b"\r\nContent-Length: 1048576\r\nExpect: 100-continue\r\n\r\n" + body)
    assert small.endswith(b"\r\nContent-Length: 5\r\n\r\nsmall")
    assert recorder.connections == 1  # the connection was kept


async def test_only_a_get_is_sent_again_when_a_kept_connection_fails() -> None:
    """The server took the request and closed the connection without an answer: it may have
    acted on it, so only a GET (no effect to repeat) goes again on a new connection; a PUT
    (an append) or a DELETE is not repeated."""
    for method, again in (("GET", True), ("PUT", False), ("DELETE", False), ("POST", False)):
        recorder = Recorder(ANSWER, HANG_UP)
        async with recorder as transport:
            await transport.request("GET", "/v1/first")  # the connection is kept
            if again:
                assert await transport.request(method, "/v1/x") == {"ok": 1}
            else:
                with pytest.raises(ConnectionFailed):
                    await transport.request(method, "/v1/x", content=b"more")
        sent = [a for a in recorder.asked if a.startswith(method.encode() + b" /v1/x ")]
        assert len(sent) == (2 if again else 1), method


async def test_answers_without_a_body_keep_their_connection() -> None:
    no_content = b"HTTP/1.1 204 No Content\r\n\r\n"
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + ANSWER
    trailers = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'9\r\n{"ok": 3}\r\n0\r\nX-Trailer: 1\r\n\r\n'
    )
    recorder = Recorder(no_content, hints, trailers)
    async with recorder as transport:
        assert await transport.request("DELETE", "/v1/a") is None
        assert await transport.request("GET", "/v1/b") == {"ok": 1}  # after the 103
        assert await transport.request("GET", "/v1/c") == {"ok": 3}  # trailers read
        assert await transport.request("GET", "/v1/d") == {"ok": 1}
    assert recorder.connections == 1


def test_the_environment_without_a_proxy_keeps_the_lane(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("no_proxy", "localhost,.internal")  # says where not to use one
    assert Transport("http://corral.invalid", "k", 30, ca=None, verify=True)._lane is not None


def test_https_in_any_case_is_tls() -> None:
    transport = Transport("HTTPS://corral.invalid", "k", 30, ca=None, verify=True)
    assert transport._tls is not None and transport._lane is not None
    assert transport._lane._tls is transport._tls and transport._lane._port == 443


def test_an_api_key_with_a_line_break_is_refused_before_anything_is_sent() -> None:
    with pytest.raises(InvalidRequest) as refused:
        Transport("http://corral.invalid", "corral_key\n", 30, ca=None, verify=True)
    assert refused.value.code == "invalid_api_key" and "line break" in refused.value.message


def test_a_socket_numbered_past_1024_is_still_checked() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft <= 2000:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    ours, theirs = socket.socketpair()
    probe = socket.socket(fileno=os.dup2(ours.fileno(), 2000))  # the same socket, as fd 2000
    try:
        assert probe.fileno() == 2000
        assert not _http1._readable(probe)  # idle and open: may be used again
        theirs.close()
        assert _http1._readable(probe)  # closed by the other side: not used
    finally:
        probe.close()
        ours.close()
        theirs.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_closed_lane_keeps_no_connection() -> None:
    recorder = Recorder()
    async with recorder as transport:
        await transport.request("GET", "/v1/a")
        await transport.aclose()
        await transport.request("GET", "/v1/b")  # still answered, on a connection not kept
        assert transport._lane is not None and transport._lane._idle == []


async def test_an_answer_before_the_whole_body_is_sent_is_read() -> None:
    """A server may refuse a body from its head alone (corral's 413 past --max-body-bytes, a
    404 for an upload) and never read it. The lane asks before it sends a large body, so the
    answer arrives instead of a reset; the connection, its body declared and unsent, is not
    used again."""
    body = b'{"error": {"code": "payload_too_large", "message": "the request body is over"}}'
    refusal = b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )
    connections = 0

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:  # each request refused from its head; the connection left open
                await reader.readuntil(b"\r\n\r\n")
                writer.write(refusal)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = Transport(f"http://127.0.0.1:{port}", None, 30, ca=None, verify=True)
    try:
        for _ in range(3):
            with pytest.raises(CorralError) as refused:
                env = {"A": "x" * (64 << 20)}
                await asyncio.wait_for(transport.request("POST", "/v1/sandboxes", json=env), 30)
            assert refused.value.code == "payload_too_large"
    finally:
        server.close()
        await transport.aclose()
    assert connections == 3
