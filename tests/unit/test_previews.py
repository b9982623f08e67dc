"""Previews without a sandbox: how a request is addressed, what of it reaches the sandbox,
and HTTP/1.1 relayed over a port connection (a scripted one here)."""

from __future__ import annotations

import asyncio
from typing import Any

from corral.server.previews import gateway
from corral.server.previews.proxy import relay

SANDBOX = "sb-3kq9z0m1x7c2v5ne"


def scope(path: str, headers: list[tuple[bytes, bytes]], query: bytes = b"") -> dict[str, Any]:
    return {
        "type": "http",
        "method": "POST",
        "path": path,
        "query_string": query,
        "headers": headers,
        "client": ("10.1.2.3", 5555),
        "scheme": "http",
    }


def test_requests_are_addressed_by_path_or_by_host_name() -> None:
    router = gateway.PreviewGateway(
        lambda *a: None, service=None, deployments=None, domain="Preview.Test"
    )  # type: ignore[arg-type]
    by_path = router._address(scope(f"/preview/{SANDBOX}/8000/a/b", []))
    assert by_path == gateway.Address(SANDBOX, 8000, f"/preview/{SANDBOX}/8000", "/a/b")
    by_host = router._address(scope("/x", [(b"host", f"8000-{SANDBOX}.preview.test".encode())]))
    assert by_host == gateway.Address(SANDBOX, 8000, "", "/x")
    assert router._address(scope("/v1/sandboxes", [(b"host", b"preview.test")])) is None
    # Deployments: by path, or by host name `{name}.{domain}`.
    deployed = router._address(scope("/deploy/shop/cart", []))
    assert deployed == gateway.Address("", 0, "/deploy/shop", "/cart", "shop")
    named = router._address(scope("/cart", [(b"host", b"shop.preview.test")]))
    assert named == gateway.Address("", 0, "", "/cart", "shop")
    assert router._address(scope("/deploy/Shop/", [])) is None
    assert router._address(scope("/deployx/shop/", [])) is None
    assert router._address(scope("/preview/sb-nope/8000/", [])) is None
    other = router._address(scope("/x", [(b"host", f"8000-{SANDBOX}.elsewhere.test".encode())]))
    assert other is None
    encoded = {
        **scope(f"/preview/{SANDBOX}/8000/a b", []),
        "raw_path": f"/preview/{SANDBOX}/8000/a%20b".encode(),
    }
    assert router._address(encoded).rest == "/a%20b"  # as the client sent it


def test_nothing_of_corrals_reaches_the_sandbox() -> None:
    sent = gateway._headers(
        scope(
            "/",
            [
                (b"host", b"example"),
                (b"x-corral-preview-token", b"corral_pv_secret"),
                (b"authorization", b"Bearer corral_apikey"),
                (b"cookie", b"corral_preview=corral_pv_secret; theirs=1"),
                (b"connection", b"keep-alive"),
                (b"x-forwarded-for", b"spoofed"),
            ],
        ),
        f"/preview/{SANDBOX}/8000",
    )
    assert dict(sent) == {
        b"host": b"example",
        b"cookie": b"theirs=1",
        b"x-forwarded-for": b"10.1.2.3",
        b"x-forwarded-proto": b"http",
        b"x-forwarded-prefix": f"/preview/{SANDBOX}/8000".encode(),
    }
    app_auth = gateway._headers(scope("/", [(b"authorization", b"Basic dTpw")]), "")
    assert (b"authorization", b"Basic dTpw") in app_auth  # the application's own passes
    assert (
        gateway._query(scope("/", [], b"a=1&corral_preview_token=x&b=2"), drop=True) == "?a=1&b=2"
    )
    token = gateway._token(scope("/", [(b"cookie", b"corral_preview=t1")]), {})
    assert token == ("t1", False)


class Scripted:
    """A port connection whose server answers with `response`, in pieces."""

    def __init__(self, *response: bytes) -> None:
        self.sent = b""
        self.response = list(response)
        self.closed = False

    async def send(self, data: bytes) -> None:
        self.sent += data

    async def receive(self) -> bytes | None:
        await asyncio.sleep(0)
        return self.response.pop(0) if self.response else None


def test_a_request_and_its_streamed_answer_are_relayed() -> None:
    stream = Scripted(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n",
        b"5\r\nhello\r\n",
        b"6\r\n world\r\n0\r\n\r\n",
    )
    incoming = [
        {"type": "http.request", "body": b"abc", "more_body": True},
        {"type": "http.request", "body": b"def", "more_body": False},
    ]
    out: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if incoming:
            return incoming.pop(0)
        await asyncio.Event().wait()  # the client stays
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        out.append(message)

    request = scope("/up", [(b"host", b"h"), (b"content-length", b"6")])
    asyncio.run(
        relay(stream, request, receive, send, target=b"/up?x=1", headers=request["headers"])
    )  # type: ignore[arg-type]
    assert stream.sent.startswith(b"POST /up?x=1 HTTP/1.1\r\n")
    assert b"connection: close\r\n" in stream.sent and stream.sent.endswith(b"\r\n\r\nabcdef")
    assert out[0]["status"] == 200 and (b"content-type", b"text/event-stream") in out[0]["headers"]
    assert all(name != b"transfer-encoding" for name, _ in out[0]["headers"])
    assert [m["body"] for m in out[1:]] == [b"hello", b" world", b""]
    assert out[-1]["more_body"] is False
