"""Node admission: what live sandboxes ask for, against what the node holds."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from corral.core.errors import InvalidRequest, LimitReached
from corral.core.spec import SandboxSpec
from corral.core.state import SandboxState
from corral.server.admission import Admission, Demand


def node(*records: tuple[SandboxSpec, SandboxState]) -> Any:
    live = [SimpleNamespace(spec=spec, state=state) for spec, state in records]
    return SimpleNamespace(registry=SimpleNamespace(live=lambda: live))


def test_running_paused_and_hibernated_sandboxes_count_what_they_hold() -> None:
    big = SandboxSpec(cpu=2, memory_mb=1024, disk_mb=4096)
    engine = node(
        (big, SandboxState.RUNNING),
        (big, SandboxState.PAUSED),
        (big, SandboxState.HIBERNATED),  # its disk only
        (big, SandboxState.CREATING),  # counted by the reservation of whoever starts it
    )
    admission = Admission(engine, Demand(cpu=100, memory_mb=3000, disk_mb=100_000))
    assert admission.in_use() == Demand(cpu=4, memory_mb=2048, disk_mb=3 * 4096)
    release = admission.reserve(SandboxSpec(memory_mb=512))
    with pytest.raises(LimitReached) as full:  # 2048 + 512 + 512 > 3000
        admission.reserve(SandboxSpec(memory_mb=512))
    assert full.value.code == "node_full" and full.value.retry_after
    assert "memory" in full.value.message
    release()
    release()  # once only
    admission.reserve(SandboxSpec(memory_mb=512))()
    with pytest.raises(InvalidRequest) as never:
        admission.check(SandboxSpec(memory_mb=4096))
    assert never.value.code == "too_large_for_node"
