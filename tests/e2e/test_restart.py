"""Restarting the server (gracefully or with SIGKILL) loses no sandbox; limits per key hold."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import corral
from corral import Sandbox
from tests.conftest import require_runtime
from tests.e2e.conftest import SERVER_DIR, Server, start_server


@pytest.fixture
def own_server(data_dir: Path) -> Iterator[Server]:
    require_runtime("namespaces")
    running = start_server(SERVER_DIR.with_name(SERVER_DIR.name + "-restart"), data_dir / "images")
    yield running
    running.stop_and_clean()


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "graceful"])
@pytest.mark.parametrize("runtime", ["namespaces", "gvisor"])
def test_sandboxes_survive_a_server_restart(own_server: Server, runtime: str, how: int) -> None:
    require_runtime(runtime)
    with own_server.client() as sdk:
        sandbox = Sandbox.create(runtime=runtime, timeout=600, client=sdk)
        sandbox.files.write("/root/kept.txt", "still here")
        expires_at = sandbox.info().expires_at
        # A command streaming to its client when the server goes down keeps running.
        background = sandbox.exec("sh", "-c", "while true; do echo tick; sleep 0.2; done")
        next(iter(background.stdout))
        short = Sandbox.create(runtime=runtime, timeout=4, client=sdk)
        deadline = short.info().expires_at
        doomed = Sandbox.create(runtime=runtime, timeout=600, client=sdk)
        doomed_pid = _runtime_pid(own_server, doomed.id)
        own_server.stop(how)
        with pytest.raises(corral.ConnectionFailed):
            background.wait()  # its stream ended with the server
    os.kill(doomed_pid, signal.SIGKILL)  # its runtime dies while no server watches
    time.sleep(max(0.0, (deadline or 0) - time.time()) + 0.5)  # the short one's life runs out
    own_server.start()

    with own_server.client() as sdk:
        again = Sandbox.connect(sandbox.id, client=sdk)
        assert again.state is corral.SandboxState.RUNNING
        assert again.files.read_text("/root/kept.txt") == "still here"
        assert any(p.id == background.id and p.running for p in again.processes())
        assert again.run("echo alive").stdout == "alive\n"
        assert again.info().expires_at == pytest.approx(expires_at, abs=1)

        ended = _wait_ended(Sandbox.connect(short.id, client=sdk))
        assert ended.end_reason is corral.EndReason.TIMEOUT
        died = _wait_ended(Sandbox.connect(doomed.id, client=sdk))
        assert died.end_reason is corral.EndReason.RUNTIME_ERROR
        assert died.end_detail
        again.terminate()


def _runtime_pid(server: Server, sandbox_id: str) -> int:
    record = json.loads((server.data_dir / "sandboxes" / sandbox_id / "sandbox.json").read_text())
    return int(record["pid"])


def _wait_ended(sandbox: Sandbox) -> corral.SandboxInfo:
    for _ in range(300):  # hang bound only
        info = sandbox.info()
        if info.state is corral.SandboxState.TERMINATED:
            return info
        time.sleep(0.1)
    raise AssertionError(f"{sandbox.id} did not end: {info}")


def test_a_key_has_a_sandbox_limit(data_dir: Path) -> None:
    require_runtime("namespaces")
    limited = start_server(
        SERVER_DIR.with_name(SERVER_DIR.name + "-limits"),
        data_dir / "images",
        "--max-sandboxes-per-key",
        "1",
    )
    try:
        with limited.client() as sdk:
            first = Sandbox.create(runtime="namespaces", client=sdk)
            with pytest.raises(corral.LimitReached) as caught:
                Sandbox.create(runtime="namespaces", client=sdk)
            assert caught.value.code == "too_many_sandboxes"
            first.terminate()
            Sandbox.create(runtime="namespaces", client=sdk).terminate()  # room again
    finally:
        limited.stop_and_clean()


def test_a_second_server_on_the_same_data_directory_is_refused(own_server: Server) -> None:
    with own_server.client() as sdk:
        sandbox = Sandbox.create(runtime="namespaces", client=sdk)
        second = Server(own_server.data_dir, own_server.data_dir / "images")
        with pytest.raises(RuntimeError, match="data_dir_in_use"):
            second.start()
        assert sandbox.run("echo unharmed").stdout == "unharmed\n"
        sandbox.terminate()
