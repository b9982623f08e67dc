"""The `corral` command, run as a user would run it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CORRAL = [sys.executable, "-m", "corral"]


def corral(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CORRAL, *args[:1], "--data-dir", str(data_dir), *args[1:]],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_run_prints_output_and_passes_the_exit_code(data_dir: Path, runtime: str) -> None:
    done = corral(data_dir, "run", "--runtime", runtime, "--", "python3", "-c", "print(6*7)")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "42\n"
    failed = corral(data_dir, "run", "--runtime", runtime, "--", "echo oops >&2; exit 3")
    assert failed.returncode == 3
    assert "oops" in failed.stderr


def test_run_reports_bad_input_clearly(data_dir: Path) -> None:
    done = corral(data_dir, "run", "--memory", "-5", "--", "true")
    assert done.returncode == 2
    assert "memory_mb" in done.stderr and "invalid_request" in done.stderr
    done = corral(data_dir, "run", "--runtime", "nope", "--", "true")
    assert done.returncode == 2
    assert "unknown_runtime" in done.stderr


def test_doctor_lists_runtimes(data_dir: Path) -> None:
    done = corral(data_dir, "doctor", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report) == {"namespaces", "gvisor"}
    assert all(isinstance(entry["available"], bool) for entry in report.values())
