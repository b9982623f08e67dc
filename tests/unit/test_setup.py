"""A fresh machine: scripts/setup picks the right runsc (under `set -o pipefail`, a check that
piped apt-cache into `grep -q` failed whenever apt-cache was still writing when grep had matched,
and the script then installed bookworm's 2022 runsc, too old for Corral); CI fails on a runtime
it needs rather than skipping it; a first start says what is wrong with its data directory."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from corral.core.errors import SandboxFailed
from corral.engine.datadir import prepare_data_dir

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "scripts" / "setup"
# apt-cache as a fresh bookworm machine with backports answers, with enough after the match
# that a reader who stops at the match leaves it writing into a closed pipe.
STUB = r"""
apt-cache() {
  printf 'runsc:\n  Installed: (none)\n  Version table:\n'
  printf '     0.0~20240729.0-4~bpo12+2 100\n'
  printf '        100 http://deb.debian.org/debian bookworm-backports/main amd64 Packages\n'
  local i; for ((i = 0; i < 20000; i++)); do printf '     padding line %d\n' "$i"; done
}
"""


def bash(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=60, check=False
    )


def test_backports_runsc_is_found_whatever_apt_cache_prints() -> None:
    found = bash(f"source {SETUP}\n{STUB}\nbackports_has_runsc bookworm && echo found")
    assert found.stdout.strip() == "found", found.stderr
    missing = bash(f"source {SETUP}\n{STUB}\nbackports_has_runsc trixie || echo missing")
    assert missing.stdout.strip() == "missing", missing.stderr


def test_the_flaw_is_real() -> None:
    """What the script did before: the same stub, piped into grep -q, reads as 'not found'."""
    old = bash(
        f"set -euo pipefail\n{STUB}\n"
        "if apt-cache policy runsc | grep -q bookworm-backports; then echo found; "
        "else echo not-found; fi"
    )
    assert old.stdout.strip() == "not-found"


def test_first_line_reads_everything() -> None:
    done = bash(f"source {SETUP}\nset -o pipefail\nseq 1 200000 | first_line")
    assert (done.returncode, done.stdout) == (0, "1\n")


def test_no_pipeline_ends_in_a_reader_that_stops_early() -> None:
    early = re.compile(r"\|\s*(grep\s+(-\w*q|--quiet)|head\b)")
    for script in (SETUP, ROOT / ".ci" / "run"):
        for number, line in enumerate(script.read_text().splitlines(), 1):
            if not line.lstrip().startswith("#"):
                assert not early.search(line), f"{script.name}:{number}: {line.strip()}"


def test_required_runtimes_fail_rather_than_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    """CI sets CORRAL_REQUIRE_RUNTIMES: a runtime it needs and cannot run fails the run."""
    from tests import conftest

    monkeypatch.setattr(conftest, "REQUIRED", {"gvisor"})
    monkeypatch.setattr(conftest.runtimes, "unavailable_reason", lambda name: "not here")
    with pytest.raises(pytest.fail.Exception, match="required"):
        conftest.require_runtime("gvisor")
    with pytest.raises(pytest.skip.Exception):
        conftest.require_runtime("namespaces")


def test_a_dangling_images_link_is_a_clear_error(tmp_path: Path) -> None:
    """A data directory whose `images` links to a directory that is gone (a test server's link
    to test images not built yet, on a fresh machine) says so, rather than FileExistsError."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "images").symlink_to(tmp_path / "not-yet")
    with pytest.raises(SandboxFailed) as refused:
        prepare_data_dir(data)
    assert refused.value.code == "bad_data_dir" and "not-yet" in refused.value.message
