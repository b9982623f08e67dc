"""OpenTelemetry traces of API calls, down through the engine's stages, exported by OTLP.

On when the operator sets the usual variables (`OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, with `OTEL_SERVICE_NAME`, `OTEL_EXPORTER_OTLP_HEADERS`,
`OTEL_BSP_*` and the rest as the SDK reads them) and `OTEL_SDK_DISABLED` is not `true`. Off,
nothing of OpenTelemetry is imported and `span` is one shared no-op.

Spans: one per HTTP request, by FastAPI's own instrumentation once a tracer provider is set
(named by method and route; a client's W3C `traceparent` continues its trace), and inside a
create one per stage of the engine's start (image, plan, record, start_queue (its turn at the
gate, and its volumes), runtime_create, runtime_start, agent_ready; or the pool claim), placed
where they happened from the engine's own stopwatch, so the trace shows where its milliseconds
went.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

_tracer: Any = None


def enabled() -> bool:
    """Whether the operator asked for traces (see the module's doc)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def start() -> None:
    """Set up the SDK and its OTLP exporter if traces are asked for; else nothing."""
    global _tracer  # noqa: PLW0603 - one tracer per process, like the SDK's own provider
    if _tracer is not None or not enabled():
        return
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "corral")})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer("corral")


def stop() -> None:
    """Send what is left (at shutdown)."""
    if _tracer is not None:
        from opentelemetry import trace

        provider: Any = trace.get_tracer_provider()
        with contextlib.suppress(Exception):
            provider.shutdown()


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[Any]:
    """A span around the block, child of the current one (None and nothing when off)."""
    if _tracer is None:
        yield None
        return
    with _tracer.start_as_current_span(name, attributes=attributes) as current:
        yield current


def stages(name: str, laps: Mapping[str, float], **attributes: Any) -> None:
    """Record, as children of the current span, a span `name` that ended now and one per
    stage in `laps` (seconds each, in order), placed back to back before now."""
    if _tracer is None or not laps:
        return
    end = time.time_ns()
    start = end - int(sum(laps.values()) * 1e9)
    from opentelemetry import trace

    parent = _tracer.start_span(name, start_time=start, attributes=attributes)
    context = trace.set_span_in_context(parent)
    at = start
    for stage, seconds in laps.items():
        child = _tracer.start_span(f"{name}.{stage}", context=context, start_time=at)
        at += int(seconds * 1e9)
        child.end(end_time=at)
    parent.end(end_time=end)
