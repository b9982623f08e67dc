"""The TypeScript SDK (sdk/typescript) against a real server: Node's own test runner runs the
SDK's tests (sdk/typescript/test), given this server's URL, a tenant's key and the runtimes
the machine has. `scripts/setup --dev` installs Node.js and the SDK's tools."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from corral import runtimes
from tests.conftest import REQUIRED, RUNTIME_NAMES, require_runtime
from tests.e2e.conftest import Server

SDK = Path(__file__).resolve().parents[2] / "sdk" / "typescript"


def npm() -> str:
    found = shutil.which("npm")
    assert found and (SDK / "node_modules" / ".bin" / "tsc").exists(), (
        "the TypeScript SDK's tools are missing: run scripts/setup --dev"
    )
    return found


def test_the_typescript_sdk_passes_its_own_tests(server: Server) -> None:
    for name in REQUIRED:
        require_runtime(name)
    available = [name for name in RUNTIME_NAMES if runtimes.unavailable_reason(name) is None]
    env = {
        **os.environ,
        "CORRAL_URL": server.url,
        "CORRAL_API_KEY": server.new_key("typescript"),
        "CORRAL_TEST_RUNTIMES": ",".join(available),
    }
    done = subprocess.run(
        [npm(), "test"],
        cwd=SDK,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,  # only against a hang: each of its tests has its own limit
        check=False,
    )
    output = done.stdout + done.stderr
    failed = [line for line in output.splitlines() if line.startswith("not ok")]
    assert done.returncode == 0 and not failed, output[-20000:]
    counts = dict(re.findall(r"^# (pass|fail|skipped|cancelled) (\d+)$", output, re.MULTILINE))
    assert int(counts.get("pass", "0")) >= 30 and counts.get("fail") == "0", counts
    if "gvisor" in available:  # nothing skipped that this machine could have run
        assert counts.get("skipped") == "0", output[-5000:]
