"""What observability costs, for bench/run.py: the exec round trip and a create against a server
with traces off (the bench's own) beside a second server exporting every span over OTLP to a
collector in this process, and against the bench's own server (audit log on, as by default)
beside one started with `--audit-retention 0`, samples interleaved; and what the metrics
observed per exec cost, timed in process (they are always on, so there is no server without
them to compare)."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.e2e.conftest import Server, free_port, start_server

from corral import AsyncClient, AsyncSandbox
from corral.server.metrics import EXEC_SECONDS, timed


class _Discard(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP collector that takes every export and keeps nothing."""

    spans_bytes = 0

    def do_POST(self) -> None:
        _Discard.spans_bytes += len(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def collector() -> Iterator[str]:
    """The endpoint of an OTLP collector in this process."""
    served = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Discard)
    threading.Thread(target=served.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{served.server_address[1]}"
    finally:
        served.shutdown()


@contextlib.contextmanager
def other_server(data_dir: Path, images: Path, *extra: str, traced: bool) -> Iterator[Server]:
    """A second server beside the bench's own: exporting traces, or with `extra` options."""
    with contextlib.ExitStack() as stack:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": stack.enter_context(collector())} if traced else {}
        server = start_server(data_dir, images, *extra, env=env)
        try:
            yield server
        finally:
            server.stop_and_clean()


def metrics_cost_us(repeat: int = 100_000) -> float:
    """Microseconds of what one exec adds to the metrics: its histogram observation."""
    start = time.perf_counter()
    for _ in range(repeat):
        with timed(EXEC_SECONDS, "bench"):
            pass
    return (time.perf_counter() - start) / repeat * 1e6


async def observability_figures(suite: Any, runtimes: list[str], summary: Any) -> None:
    ours = Path(suite.args.data_dir)
    for topic, extra, traced in (
        ("traces", (), True),
        ("audit", ("--audit-retention", "0"), False),
    ):
        context = other_server(ours.with_name(f"{ours.name}-{topic}"), ours / "images", *extra,
                               traced=traced)  # fmt: skip
        server = await asyncio.to_thread(context.__enter__)
        try:
            async with AsyncClient(url=server.url, api_key=server.admin_key) as other:
                # (the base, then what it adds): traces off then exported; audit off then on
                pair = {"off": suite.client, "exported": other} if traced else {
                    "off": other, "on": suite.client}  # fmt: skip
                for runtime in runtimes:
                    await _pair(suite, runtime, topic, pair, summary)
        finally:  # it stops the server and ends its sandboxes with an event loop of its own
            await asyncio.to_thread(context.__exit__, None, None, None)
    exec_p50 = suite.results.get("exec, traces off", {}).get(runtimes[0], {}).get("p50_ms")
    cost = metrics_cost_us()
    share = round(cost / 1000 / exec_p50 * 100, 3) if exec_p50 else None
    suite.record("metrics per exec", "host", {"us": round(cost, 2), "percent_of_exec": share})


async def _pair(
    suite: Any, runtime: str, topic: str, clients: dict[str, AsyncClient], summary: Any
) -> None:
    boxes = {
        name: await AsyncSandbox.create(runtime=runtime, pool=False, client=client)
        for name, client in clients.items()
    }
    execs: dict[str, list[float]] = {name: [] for name in clients}
    creates: dict[str, list[float]] = {name: [] for name in clients}
    try:
        for _ in range(suite.args.samples):  # interleaved: both see the same machine
            for name, sandbox in boxes.items():
                execs[name].append(await suite.timed(lambda s=sandbox: s.run(["true"])))
        for _ in range(max(5, suite.args.samples // 10)):
            for name, client in clients.items():
                start = time.perf_counter()
                made = await AsyncSandbox.create(runtime=runtime, pool=False, client=client)
                creates[name].append(time.perf_counter() - start)
                await made.terminate()
    finally:
        for sandbox in boxes.values():
            await sandbox.terminate()
    for name in clients:
        suite.record(f"exec, {topic} {name}", runtime, summary(execs[name]))
        suite.record(f"create, {topic} {name}", runtime, summary(creates[name]))
    added = {}
    for what, samples in (("exec", execs), ("create", creates)):
        off, on = (summary(samples[name])["p50_ms"] for name in clients)
        added[f"{what}_percent"] = round((on - off) / off * 100, 1)
    label = "traces exported" if topic == "traces" else "audit log"
    suite.record(f"{label}, added at p50", runtime, added)
