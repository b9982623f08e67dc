"""What an operator sees: Prometheus metrics scraped and parsed with prometheus-client's own
parser, each sandbox's recent use (`sandbox.metrics()`, `corral top`), and who may see what."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import corral
from corral import Client, Sandbox, UsageSample
from corral.core.ids import new_id
from tests.conftest import require_runtime
from tests.e2e.conftest import SERVER_DIR, Server, start_server


@pytest.fixture(scope="module")
def server(data_dir: Path) -> Iterator[Server]:
    """This module's server writes its logs as JSON, at info level."""
    require_runtime("namespaces")
    running = start_server(
        SERVER_DIR.with_name(SERVER_DIR.name + "-observability"),
        data_dir / "images",
        "--log-format", "json", "--log-level", "info",
    )  # fmt: skip
    yield running
    running.stop_and_clean()


def scrape(server: Server, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key or server.admin_key}"}
    return httpx.get(f"{server.url}/metrics", headers=headers, timeout=30)


def values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape by (name, sorted labels)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


def until(check: Callable[[], bool], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "it never happened"
        time.sleep(0.5)


def test_prometheus_scrapes_what_happened(server: Server, client: Client) -> None:
    assert httpx.get(f"{server.url}/metrics", timeout=30).status_code == 401
    tenant = server.new_key("metrics-tenant")
    refused = scrape(server, tenant)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_required"
    with Sandbox.create(runtime="namespaces", client=client) as sandbox:
        assert sandbox.run("echo ok").stdout == "ok\n"
        sandbox.files.write("/root/data.bin", b"x" * 100_000)
        assert len(sandbox.files.read("/root/data.bin")) == 100_000
        missing = httpx.get(
            f"{server.url}/v1/sandboxes/{new_id('sb')}/metrics",
            headers={"Authorization": f"Bearer {server.admin_key}"},
        )
        assert missing.status_code == 404

        def sampled() -> bool:
            return any(
                name == "corral_sandbox_memory_bytes" and ("sandbox_id", sandbox.id) in labels
                for name, labels in values(scrape(server).text)
            )

        until(sampled)  # the sampler runs every 5 s
        answer = scrape(server)
        assert answer.headers["content-type"].startswith("text/plain")
        seen = values(answer.text)
        running = seen["corral_sandboxes", (("runtime", "namespaces"), ("state", "running"))]
        assert running >= 1
        assert seen["corral_create_seconds_count", (("runtime", "namespaces"),)] >= 1
        assert seen["corral_exec_seconds_count", (("runtime", "namespaces"),)] >= 1
        assert seen["corral_file_bytes_total", (("direction", "in"),)] >= 100_000
        assert seen["corral_file_bytes_total", (("direction", "out"),)] >= 100_000
        assert seen["corral_api_errors_total", (("code", "sandbox_not_found"), ("status", "404"))]
        assert seen["corral_api_errors_total", (("code", "admin_required"), ("status", "403"))]
        memory = {
            dict(labels)["key_id"]: value
            for (name, labels), value in seen.items()
            if name == "corral_sandbox_memory_bytes" and ("sandbox_id", sandbox.id) in labels
        }
        (key_id, used), *_ = memory.items()
        assert key_id.startswith("key-") and used > 0, memory


def test_wakes_are_timed_whether_asked_for_or_on_use(server: Server, client: Client) -> None:
    require_runtime("gvisor")

    def wakes() -> float:
        return values(scrape(server).text).get(
            ("corral_wake_seconds_count", (("runtime", "gvisor"),)), 0.0
        )

    before = wakes()
    with Sandbox.create(runtime="gvisor", client=client) as sandbox:
        sandbox.hibernate()
        sandbox.wake()  # asked for
        assert wakes() == before + 1
        sandbox.hibernate()
        assert sandbox.run("echo up").stdout == "up\n"  # woken by the command
        assert wakes() == before + 2


def test_a_sandbox_reports_its_recent_use(server: Server, client: Client) -> None:
    with Sandbox.create(runtime="namespaces", client=client) as sandbox:
        first = sandbox.metrics()
        assert first and isinstance(first[0], UsageSample) and first[0].memory_bytes > 0
        sandbox.run("dd if=/dev/urandom of=/root/big bs=1M count=8 status=none")
        busy = sandbox.exec("sh", "-c", "timeout 12 sh -c 'while :; do :; done'")

        def burned() -> bool:
            samples = sandbox.metrics()
            return len(samples) >= 2 and samples[-1].cpu_percent > 20

        until(burned, 40)
        busy.kill()
        samples = sandbox.metrics()
        assert samples == sorted(samples, key=lambda s: s.at)
        assert samples[-1].cpu_seconds > first[0].cpu_seconds
        assert samples[-1].disk_bytes >= first[0].disk_bytes + 8 * 1024 * 1024 * 0.9
        other = corral.Client(url=server.url, api_key=server.new_key("metrics-other"))
        with other:
            assert other.sandbox_usage() == []  # none of the owner's
            try:
                Sandbox.connect(sandbox.id, client=other).metrics()
            except corral.SandboxNotFound:
                pass
            else:
                raise AssertionError("another key read the sandbox's metrics")
        rows = {row["sandbox_id"]: row for row in client.sandbox_usage()}
        assert rows[sandbox.id]["state"] == "running"
        assert isinstance(rows[sandbox.id]["sample"], UsageSample)

        env = {**os.environ, "CORRAL_URL": server.url, "CORRAL_API_KEY": server.admin_key}
        top = subprocess.run(
            [sys.executable, "-m", "corral", "top", "--json"],
            capture_output=True, text=True, timeout=120, check=False, env=env,
        )  # fmt: skip
        assert top.returncode == 0, top.stderr
        shown = {row["sandbox_id"]: row for row in json.loads(top.stdout)}
        assert shown[sandbox.id]["sample"]["memory_bytes"] > 0
        table = subprocess.run(
            [sys.executable, "-m", "corral", "top", "--once"],
            capture_output=True, text=True, timeout=120, check=False, env=env,
        )  # fmt: skip
        assert sandbox.id in table.stdout and "cpu %" in table.stdout


def test_json_logs_carry_the_request_key_and_sandbox(server: Server, client: Client) -> None:
    with Sandbox.create(runtime="namespaces", client=client) as sandbox:
        request_id = f"trace-me.{secrets.token_hex(4)}"  # the log file outlives a run
        headers = {"Authorization": f"Bearer {server.admin_key}", "X-Request-Id": request_id}
        answer = httpx.get(f"{server.url}/v1/sandboxes/{sandbox.id}", headers=headers)
        assert answer.headers["x-request-id"] == request_id
        odd = httpx.get(f"{server.url}/healthz", headers={"X-Request-Id": "bad id!"})
        assert odd.headers["x-request-id"].startswith("req-")  # not echoed: a new one

        def logged() -> list[dict[str, object]]:
            lines = server.log.read_text().splitlines()
            parsed = [json.loads(line) for line in lines if line.startswith("{")]
            return [line for line in parsed if line["request_id"] == request_id]

        until(lambda: bool(logged()))
        (line, *_) = logged()
        assert line["sandbox_id"] == sandbox.id
        assert str(line["key_id"]).startswith("key-")
        assert sandbox.id in str(line["message"]) and line["logger"] == "uvicorn.access"
        assert {"time", "level"} <= set(line)
    # No log line in uvicorn's or Python's plain formats: every one is a JSON object.
    plain = ("INFO:", "WARNING:", "ERROR:", "DEBUG:", "Traceback")
    assert not [text for text in server.log.read_text().splitlines() if text.startswith(plain)]
