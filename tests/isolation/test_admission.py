"""Node admission: every sandbox Corral starts counts against what the node can hold (the
operator's overcommit ratios), and a build whose client went away stops."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import corral
from corral import Image, Sandbox
from tests.conftest import require_runtime
from tests.e2e.conftest import SERVER_DIR, start_server

CAPACITY_MIB = 5000  # of memory, for sandboxes of 2048 MiB and builds of 4096 MiB


def machine_memory_mib() -> float:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_every_sandbox_counts_against_what_the_node_holds(data_dir: Path) -> None:
    require_runtime("namespaces")
    ratio = CAPACITY_MIB / machine_memory_mib()
    server = start_server(
        SERVER_DIR.with_name(SERVER_DIR.name + "-admission"),
        data_dir / "images",
        "--overcommit",
        f"memory={ratio:.6f}",
    )
    try:
        with server.client(server.new_key("tenant")) as client:
            first = Sandbox.create(runtime="namespaces", memory_mb=2048, client=client)
            with pytest.raises(corral.LimitReached) as full:  # 3 x 2048 MiB > 5000
                first.fork(2)
            assert full.value.code == "node_full" and full.value.retry_after
            with pytest.raises(corral.InvalidRequest) as never:
                Sandbox.create(runtime="namespaces", memory_mb=8192, client=client)
            assert never.value.code == "too_large_for_node"
            # A build's step sandbox (4096 MiB) counts too.
            with pytest.raises(corral.LimitReached) as building:
                Image.debian_slim().run_commands("true").build(client=client)
            assert building.value.code == "node_full"
            first.terminate()
            Image.debian_slim().run_commands("echo admitted").build(client=client)
            with Sandbox.create(runtime="namespaces", memory_mb=2048, client=client) as again:
                assert again.run("echo room again").stdout == "room again\n"
        bad = subprocess.run(
            [sys.executable, "-m", "corral", "serve", "--overcommit", "memory=-1"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert bad.returncode != 0 and "invalid_overcommit" in bad.stdout + bad.stderr
    finally:
        server.stop_and_clean()


def test_a_build_whose_client_went_away_stops(data_dir: Path) -> None:
    require_runtime("namespaces")
    server = start_server(SERVER_DIR.with_name(SERVER_DIR.name + "-admission"), data_dir / "images")
    marker = "6173"  # seconds: a sleep nothing else on the host runs
    try:
        recipe = Image.debian_slim().run_commands(f"echo {time.time()}; sleep {marker}").recipe()
        headers = {"Authorization": f"Bearer {server.admin_key}"}
        with httpx.stream(
            "POST", f"{server.url}/v1/images", json={"recipe": recipe}, headers=headers, timeout=60
        ) as response:
            assert response.status_code == 200
            deadline = time.monotonic() + 120  # hangs, not speeds
            while not sleeping(marker):  # the step's command runs
                assert time.monotonic() < deadline, "the build's step never started"
                time.sleep(0.2)
        deadline = time.monotonic() + 60
        while sleeping(marker):
            assert time.monotonic() < deadline, "the build went on after its client left"
            time.sleep(0.5)
    finally:
        server.stop_and_clean()


def sleeping(marker: str) -> bool:
    found = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True, check=False)
    return found.returncode == 0
