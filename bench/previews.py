"""Previews' figures, for bench/run.py: a small request through a preview beside the same
request to the same server run directly on the host (the proxy's cost), requests per second
and MiB/s through one preview, and the first request that wakes a hibernated sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from tests.e2e.conftest import free_port

from corral import AsyncDeployment, AsyncSandbox

APP = Path(__file__).resolve().parents[1] / "tests" / "e2e" / "apps" / "web.py"
MiB = 1024 * 1024
HIBERNATE_SETTLE = 3.0


async def preview_figures(suite: Any, runtimes: list[str], summary: Any) -> None:
    port = free_port()
    direct = subprocess.Popen([sys.executable, str(APP), str(port)])  # noqa: ASYNC220 - once
    try:
        async with httpx.AsyncClient(timeout=60) as http:
            await _until_up(http, f"http://127.0.0.1:{port}/echo", {})
            baseline = [
                await _timed(http, f"http://127.0.0.1:{port}/echo", {})
                for _ in range(suite.args.samples)
            ]
            suite.record("small request, direct to the host", "host", summary(baseline))
            for runtime in runtimes:
                await _through_preview(suite, http, runtime, summary)
            if "gvisor" in runtimes:
                await _wake(suite, http, summary)
                await _deployment_wake(suite, http, summary)
    finally:
        direct.terminate()
        await asyncio.to_thread(direct.wait)


async def _serving(
    suite: Any, runtime: str, **spec: Any
) -> tuple[AsyncSandbox, str, dict[str, str]]:
    sandbox = await AsyncSandbox.create(runtime=runtime, pool=False, client=suite.client, **spec)
    await sandbox.files.write("/srv/web.py", APP.read_text())
    await sandbox.run("nohup python3 /srv/web.py 8000 > /tmp/web.log 2>&1 &")
    preview = await sandbox.expose(8000)
    url = f"{suite.server.url}/preview/{sandbox.id}/8000/"
    return sandbox, url, dict(preview.headers)


async def _through_preview(suite: Any, http: httpx.AsyncClient, runtime: str, summary: Any) -> None:
    sandbox, url, headers = await _serving(suite, runtime)
    try:
        await _until_up(http, url + "echo", headers)
        steps = [await _timed(http, url + "echo", headers) for _ in range(suite.args.samples)]
        suite.record("small request through a preview", runtime, summary(steps))
        done, seconds = 0, 5.0
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                await http.get(url + "echo", headers=headers)
                done += 1

        await asyncio.gather(*(worker() for _ in range(16)))
        suite.record(
            "requests per second, one preview, 16 clients", runtime, {"rps": round(done / seconds)}
        )
        size = 200 * MiB
        start = time.perf_counter()
        async with http.stream("GET", url + f"big?n={size}", headers=headers) as big:
            got = sum([len(chunk) async for chunk in big.aiter_bytes()])
        assert got == size
        suite.record(
            "download through a preview",
            runtime,
            {"MiB_per_s": round(size / MiB / (time.perf_counter() - start))},
        )
    finally:
        await sandbox.terminate()


async def _wake(suite: Any, http: httpx.AsyncClient, summary: Any) -> None:
    """Hibernate a sandbox holding 50 MiB of state, then time the first request."""
    sandbox, url, headers = await _serving(suite, "gvisor", memory_mb=1024)
    try:
        await _until_up(http, url + "echo", headers)
        hold = (
            "python3 -c 'import os, time; b = bytearray(os.urandom(50 << 20)); time.sleep(86400)'"
        )
        await sandbox.run(f"nohup {hold} > /dev/null 2>&1 &")
        waits = []
        for _ in range(max(suite.args.samples // 20, 5)):
            await _hibernated(sandbox)
            waits.append(await _timed(http, url + "echo", headers))
        suite.record("first request to a hibernated sandbox (50 MiB)", "gvisor", summary(waits))
    finally:
        await sandbox.terminate()


async def _deployment_wake(suite: Any, http: httpx.AsyncClient, summary: Any) -> None:
    """A deployment whose instance holds 50 MiB: a small request to it awake, then the first
    request after each hibernation (what an idle deployment's next caller waits)."""
    hold = "import os, time; b = bytearray(os.urandom(50 << 20)); time.sleep(86400)"
    deployed = await AsyncDeployment.create(
        "bench-wake",
        image="debian",
        command=["sh", "-c", 'python3 -c "$HOLD" & exec python3 -c "$APP" 8000'],
        env={"HOLD": hold, "APP": APP.read_text()},
        port=8000,
        runtime="gvisor",
        memory_mb=1024,
        idle_timeout=3600,
        client=suite.client,
    )
    try:
        url = deployed.url + "echo"
        steps = [await _timed(http, url, {}) for _ in range(suite.args.samples)]
        suite.record("small request to a deployment", "gvisor", summary(steps))
        instance = await AsyncSandbox.connect(deployed.instance or "", client=suite.client)
        waits = []
        for _ in range(max(suite.args.samples // 20, 5)):
            await _hibernated(instance)
            waits.append(await _timed(http, url, {}))
        suite.record("first request to a hibernated deployment (50 MiB)", "gvisor", summary(waits))
    finally:
        await deployed.delete()


async def _hibernated(sandbox: AsyncSandbox) -> None:
    """Hibernate, and let runsc's cleanup of the stopped sandbox finish (1 to 2 s in the
    background): a request after an idle timeout comes long after it, not at once."""
    await sandbox.hibernate()
    await asyncio.sleep(HIBERNATE_SETTLE)


async def _timed(http: httpx.AsyncClient, url: str, headers: dict[str, str]) -> float:
    start = time.perf_counter()
    answer = await http.get(url, headers=headers)
    assert answer.status_code == 200, answer.text[:300]
    return time.perf_counter() - start


async def _until_up(http: httpx.AsyncClient, url: str, headers: dict[str, str]) -> None:
    for _ in range(300):
        with contextlib.suppress(httpx.TransportError):  # not listening yet
            if (await http.get(url, headers=headers)).status_code == 200:
                return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} never answered")
