"""Prometheus metrics of one server: `GET /metrics` (admin keys only: it names every key's
sandboxes).

Counters and histograms are observed where things happen (creates, commands, wakes, errors,
bytes through files and previews, refused connections); the rest is read when scraped: sandboxes
by state and runtime, pools, and each sandbox's CPU, memory, processes, disk and network from
its newest sample (`corral.engine.usage`).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter as Tally
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from corral.engine import Engine
    from corral.engine.pools import Pool

REGISTRY = CollectorRegistry(auto_describe=True)
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

CREATE_SECONDS = Histogram(
    "corral_create_seconds", "Time to create a sandbox, until it runs commands.",
    ["runtime"], buckets=_LATENCY, registry=REGISTRY,
)  # fmt: skip
EXEC_SECONDS = Histogram(
    "corral_exec_seconds", "Time of a command run to completion (POST .../exec), end to end.",
    ["runtime"], buckets=_LATENCY, registry=REGISTRY,
)  # fmt: skip
WAKE_SECONDS = Histogram(
    "corral_wake_seconds", "Time to wake a hibernated sandbox.",
    ["runtime"], buckets=_LATENCY, registry=REGISTRY,
)  # fmt: skip
ERRORS = Counter(
    "corral_api_errors", "Requests answered with an error, by code and status.",
    ["code", "status"], registry=REGISTRY,
)  # fmt: skip
FILE_BYTES = Counter(
    "corral_file_bytes", "Bytes through the files API (in: uploads; out: downloads).",
    ["direction"], registry=REGISTRY,
)  # fmt: skip
PREVIEW_BYTES = Counter(
    "corral_preview_bytes", "Bytes through previews and deployments (in: to the sandbox).",
    ["direction"], registry=REGISTRY,
)  # fmt: skip
EGRESS_DENIED = Counter(
    "corral_egress_denied", "Connections and DNS questions egress rules refused.",
    ["protocol"], registry=REGISTRY,
)  # fmt: skip
AUDIT_DROPPED = Counter(
    "corral_audit_dropped", "Audit entries lost: the queue was full or the store failed.",
    registry=REGISTRY,
)  # fmt: skip


@contextlib.contextmanager
def timed(histogram: Histogram, runtime: str) -> Iterator[None]:
    """Observe the block's seconds in `histogram` if it ends without an error."""
    start = time.perf_counter()
    yield
    histogram.labels(runtime).observe(time.perf_counter() - start)


_PER_SANDBOX: tuple[tuple[type[CounterMetricFamily | GaugeMetricFamily], str, str, str], ...] = (
    (CounterMetricFamily, "corral_sandbox_cpu_seconds", "CPU time a sandbox used.", "cpu_seconds"),
    (GaugeMetricFamily, "corral_sandbox_memory_bytes", "Memory a sandbox uses.", "memory_bytes"),
    (GaugeMetricFamily, "corral_sandbox_processes", "Processes in a sandbox.", "processes"),
    (GaugeMetricFamily, "corral_sandbox_disk_bytes", "Bytes used on its disk.", "disk_bytes"),
    (CounterMetricFamily, "corral_sandbox_network_receive_bytes", "Bytes it received.",
     "net_rx_bytes"),
    (CounterMetricFamily, "corral_sandbox_network_transmit_bytes", "Bytes it sent.",
     "net_tx_bytes"),
)  # fmt: skip


class _Live(Collector):
    """What is read at scrape time from the engine."""

    def __init__(self, engine: Engine, owners: Mapping[str, str]) -> None:
        self._engine = engine
        self._owners = owners

    def collect(self) -> Iterator[Metric]:
        engine, owners = self._engine, self._owners
        states: Tally[tuple[str, str]] = Tally()
        dozing: Tally[str] = Tally()
        for record in engine.registry.live():
            state = "pooled" if record.pooled else record.state.value
            states[state, record.runtime] += 1
            dozing[record.runtime] += record.link.waker is not None
        sandboxes = GaugeMetricFamily(
            "corral_sandboxes", "Live sandboxes by state and runtime.", labels=["state", "runtime"]
        )
        for (state, runtime), count in sorted(states.items()):
            sandboxes.add_metric([state, runtime], count)
        yield sandboxes
        frozen = GaugeMetricFamily(
            "corral_sandboxes_dozing", "Running sandboxes frozen until their next use.",
            labels=["runtime"],
        )  # fmt: skip
        for runtime, count in sorted(dozing.items()):
            frozen.add_metric([runtime], count)
        yield frozen
        yield from _pools(engine.pools.list())
        latest = sorted(engine.usage.latest().items())
        for kind, name, text, field in _PER_SANDBOX:
            family = kind(name, text, labels=["sandbox_id", "key_id"])
            for sandbox_id, sample in latest:
                family.add_metric([sandbox_id, owners.get(sandbox_id, "")], getattr(sample, field))
            yield family


def _pools(pools: list[Pool]) -> Iterator[Metric]:
    idle = GaugeMetricFamily("corral_pool_idle", "Idle sandboxes in a pool.", labels=["pool"])
    claims = CounterMetricFamily(
        "corral_pool_claims", "Creates a pool served (hit) or could not (miss).",
        labels=["pool", "result"],
    )  # fmt: skip
    for pool in pools:
        idle.add_metric([pool.name], len(pool.idle))
        claims.add_metric([pool.name, "hit"], pool.hits)
        claims.add_metric([pool.name, "miss"], pool.misses)
    yield idle
    yield claims


def exposition(engine: Engine, owners: Mapping[str, str]) -> bytes:
    """Every metric in Prometheus's text format (`owners`: each live sandbox's key id)."""
    live = CollectorRegistry(auto_describe=False)
    live.register(_Live(engine, owners))
    return generate_latest(REGISTRY) + generate_latest(live)
