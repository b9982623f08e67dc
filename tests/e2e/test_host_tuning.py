"""What a real `corral serve` changes of its host as it starts (`service.tune_host`): the
kernel's cgroup mode, where the kernel has it (its choices: tests/unit/test_favordynmods.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.host import cgroups
from tests.e2e.conftest import Server


def test_a_started_server_has_turned_on_favordynmods(server: Server) -> None:
    if "favordynmods" not in Path("/sys/kernel/cgroup/features").read_text().split():
        pytest.skip("this kernel has no favordynmods mode")
    found = cgroups.cgroup2_mount(Path("/proc/self/mountinfo").read_text())
    assert found is not None, "no cgroup2 mount on this host"
    assert "favordynmods" in found[2]
