"""Traces: a server started with the usual OTEL_* variables exports, over OTLP/HTTP, one trace per
API call, and a create's trace shows the engine's stages inside it; received here by an
in-process OTLP collector and decoded with OpenTelemetry's own protobuf messages."""

from __future__ import annotations

import gzip
import http.server
import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from corral import Client, Sandbox
from tests.conftest import require_runtime
from tests.e2e.conftest import SERVER_DIR, Server, free_port, start_server


class Collector(http.server.ThreadingHTTPServer):
    """An OTLP/HTTP receiver on loopback: every span it is sent, by span id."""

    def __init__(self) -> None:
        self.spans: dict[bytes, Any] = {}
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", free_port()), _Receive)


class _Receive(http.server.BaseHTTPRequestHandler):
    server: Collector

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        request = ExportTraceServiceRequest.FromString(body)
        with self.server.lock:
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    for span in scope.spans:
                        self.server.spans[span.span_id] = span
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    receiver = Collector()
    thread = threading.Thread(target=receiver.serve_forever, daemon=True)
    thread.start()
    yield receiver
    receiver.shutdown()
    receiver.server_close()


@pytest.fixture(scope="module")
def server(data_dir: Path, collector: Collector) -> Iterator[Server]:
    require_runtime("namespaces")
    settings = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.server_address[1]}",
        "OTEL_SERVICE_NAME": "corral-under-test",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    directory = SERVER_DIR.with_name(SERVER_DIR.name + "-traces")
    running = start_server(directory, data_dir / "images", env=settings)
    yield running
    running.stop_and_clean()


def within(collector: Collector, span: Any, ancestor: Any) -> bool:
    """Whether `ancestor` is `span`'s parent, or its parent's, and so on."""
    while span.parent_span_id:
        if span.parent_span_id == ancestor.span_id:
            return True
        span = collector.spans.get(span.parent_span_id)
        if span is None:
            return False
    return False


def spans_named(collector: Collector, name: str) -> list[Any]:
    with collector.lock:
        return [span for span in collector.spans.values() if span.name == name]


def test_a_create_is_one_trace_down_to_the_engines_stages(
    server: Server, client: Client, collector: Collector
) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = "00f067aa0ba902b7"
    headers = {
        "Authorization": f"Bearer {server.admin_key}",
        "traceparent": f"00-{trace_id}-{parent}-01",  # the client's own trace goes on
    }
    made = httpx.post(
        f"{server.url}/v1/sandboxes", json={"runtime": "namespaces", "pool": False},
        headers=headers, timeout=120,
    )  # fmt: skip
    assert made.status_code == 201, made.text
    sandbox = Sandbox.connect(made.json()["id"], client=client)
    try:
        assert sandbox.run("true").exit_code == 0
        deadline = time.monotonic() + 30
        while not (spans_named(collector, "engine.create.agent_ready")
                   and spans_named(collector, "engine.exec")):  # fmt: skip
            assert time.monotonic() < deadline, sorted({s.name for s in collector.spans.values()})
            time.sleep(0.2)
    finally:
        sandbox.terminate()
    (request,) = [
        span
        for span in spans_named(collector, "POST /v1/sandboxes")
        if span.trace_id.hex() == trace_id
    ]
    assert request.trace_id.hex() == trace_id and request.parent_span_id.hex() == parent
    (create,) = spans_named(collector, "engine.create")
    assert create.trace_id == request.trace_id and within(collector, create, request)
    stages = sorted(
        (span for span in collector.spans.values() if span.parent_span_id == create.span_id),
        key=lambda span: span.start_time_unix_nano,
    )
    names = [span.name.removeprefix("engine.create.") for span in stages]
    assert names[0] == "image" and names[-1] == "agent_ready", names
    assert {"runtime_create", "runtime_start"} <= set(names)
    for before, after in itertools.pairwise(stages):
        assert before.end_time_unix_nano <= after.start_time_unix_nano + 1_000
    assert request.start_time_unix_nano <= create.start_time_unix_nano
    assert create.end_time_unix_nano <= request.end_time_unix_nano
    attributes = {a.key: a.value.string_value for a in create.attributes}
    assert attributes["sandbox_id"] == sandbox.id and attributes["runtime"] == "namespaces"
    (run,) = spans_named(collector, "engine.exec")
    (exec_call,) = spans_named(collector, "POST /v1/sandboxes/{sandbox_id}/exec")
    assert within(collector, run, exec_call)
