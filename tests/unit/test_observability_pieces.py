"""Pieces of observability that need no server: webhook signatures and URL checks, JSON log
lines with the request's ids, request ids given and made, the metric exposition's parse."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from corral.core.errors import InvalidRequest
from corral.core.models import UsageSample
from corral.images.oci.egress import Egress
from corral.server import logs
from corral.server.metrics import REGISTRY
from corral.server.webhooks import check_events, check_url, signature


def test_signatures_are_hmac_of_the_time_and_body() -> None:
    header = signature("s3cret", 1_700_000_000, b'{"a": 1}')
    stamp, mac = header.split(",")
    assert stamp == "t=1700000000"
    expected = hmac.new(b"s3cret", b'1700000000.{"a": 1}', hashlib.sha256).hexdigest()
    assert mac == f"v1={expected}"
    assert signature("other", 1_700_000_000, b'{"a": 1}') != header


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1/x", "http://[::1]/x", "http://10.1.2.3/", "http://169.254.169.254/",
     "http://168.63.129.16/", "https://0.0.0.0/", "ftp://example.com/", "http://u:p@example.com/",
     "", "/relative", "http:///nohost", 5, None],
)  # fmt: skip
def test_webhook_urls_off_limits_are_refused(url: object) -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_url(url, Egress())
    assert caught.value.code == "invalid_webhook"


def test_the_operator_may_allow_a_host_by_name() -> None:
    assert check_url("http://localhost:8080/hook", Egress.of(["localhost"])) == (
        "http://localhost:8080/hook"
    )
    with pytest.raises(InvalidRequest):
        check_url("http://localhost:8080/hook", Egress.of(["localhost:9"]))
    assert check_events(None) == ("sandbox.state", "sandbox.egress_denied")
    for bad in ([], ["sandbox.other"], "sandbox.state", [1]):
        with pytest.raises(InvalidRequest):
            check_events(bad)


def test_json_log_lines_carry_the_request() -> None:
    record = logging.LogRecord("corral.x", logging.WARNING, __file__, 1, "hello %s", ("you",), None)
    tokens = [logs.REQUEST_ID.set("req-1"), logs.KEY_ID.set("key-1"), logs.SANDBOX_ID.set("sb-1")]
    try:
        line = json.loads(logs.JsonFormatter().format(record))
    finally:
        for var, token in zip((logs.REQUEST_ID, logs.KEY_ID, logs.SANDBOX_ID), tokens, strict=True):
            var.reset(token)
    assert line["message"] == "hello you" and line["level"] == "warning"
    assert (line["request_id"], line["key_id"], line["sandbox_id"]) == ("req-1", "key-1", "sb-1")


async def test_request_ids_are_echoed_or_made_and_sandboxes_noted() -> None:
    async def seen(request: Request) -> PlainTextResponse:
        return PlainTextResponse(f"{logs.REQUEST_ID.get()} {logs.SANDBOX_ID.get()}")

    app = logs.RequestContext(Starlette(routes=[Route("/v1/sandboxes/{sid}/files", seen)]))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        given = await http.get("/v1/sandboxes/sb-abc123/files", headers={"X-Request-Id": "mine-1"})
        assert given.text == "mine-1 sb-abc123" and given.headers["x-request-id"] == "mine-1"
        odd = await http.get("/v1/sandboxes/sb-abc123/files", headers={"X-Request-Id": "a b"})
        made = odd.headers["x-request-id"]
        assert made.startswith("req-") and odd.text.startswith(made)  # not echoed: a new one
    assert logs.REQUEST_ID.get() is None  # nothing leaks out of the request


def test_samples_round_trip_and_the_exposition_parses() -> None:
    sample = UsageSample(1.0, 2.5, 50.0, 1 << 20, 3, 4096, 10, 20)
    assert UsageSample.from_dict(json.loads(json.dumps(sample.to_dict()))) == sample
    from prometheus_client import generate_latest

    names = {
        family.name for family in text_string_to_metric_families(generate_latest(REGISTRY).decode())
    }
    assert {"corral_exec_seconds", "corral_api_errors", "corral_egress_denied"} <= names
