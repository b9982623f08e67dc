"""What each sandbox uses, sampled every few seconds and kept for a bounded window: CPU, memory,
processes (from its cgroup), disk (its quota filesystem) and network (its veth on the host).

`Usage.history(sandbox_id)` is one sandbox's recent samples, oldest first (`sandbox.metrics()`,
`GET /v1/sandboxes/{id}/metrics`); `Usage.latest()` the newest of each, for `/metrics` and
`corral top`. Reading them costs a few small files per sandbox and never touches the guest.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from pathlib import Path

from corral.core.models import UsageSample
from corral.core.state import SandboxState
from corral.engine.record import SandboxRecord
from corral.engine.registry import Registry
from corral.runtimes.base import cgroup_for

log = logging.getLogger("corral.engine")

SAMPLE_EVERY = 5.0  # seconds
SAMPLES_KEPT = 120  # ten minutes of them


def _disk_used(path: Path) -> int:
    try:
        stat = os.statvfs(path)
    except OSError:
        return 0
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


def _counter(path: Path) -> int:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return 0


def sample(record: SandboxRecord, previous: UsageSample | None) -> UsageSample:
    """Read `record`'s use now."""
    plan = record.plan
    cpu, memory, processes = cgroup_for(plan).usage()
    now = time.time()
    percent = 0.0
    if previous is not None and now > previous.at:
        percent = max(0.0, (cpu - previous.cpu_seconds) / (now - previous.at) * 100)
    rx = tx = 0
    if plan.network.policy == "internet":
        stats = Path("/sys/class/net") / plan.host_scope.iface(plan.network.index) / "statistics"
        # The host's end of the veth: what it sends, the sandbox receives.
        rx, tx = _counter(stats / "tx_bytes"), _counter(stats / "rx_bytes")
    return UsageSample(
        at=now,
        cpu_seconds=round(cpu, 3),
        cpu_percent=round(percent, 1),
        memory_bytes=memory,
        processes=processes,
        disk_bytes=_disk_used(plan.disk_dir),
        net_rx_bytes=rx,
        net_tx_bytes=tx,
    )


class Usage:
    """Samples of every running or paused sandbox, every `SAMPLE_EVERY` seconds."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._samples: dict[str, collections.deque[UsageSample]] = {}
        self._task: asyncio.Task[None] | None = None

    def history(self, sandbox_id: str) -> list[UsageSample]:
        """The sandbox's samples, oldest first (a first one is read now if there is none)."""
        kept = self._samples.get(sandbox_id)
        if not kept:
            record = self._registry.get(sandbox_id)
            if _sampled(record):
                self._add(record)
            kept = self._samples.get(sandbox_id, collections.deque())
        return list(kept)

    def latest(self) -> dict[str, UsageSample]:
        """The newest sample of each live sandbox."""
        return {sandbox_id: kept[-1] for sandbox_id, kept in self._samples.items() if kept}

    def sample_all(self) -> None:
        live = {record.id: record for record in self._registry.live() if not record.pooled}
        for sandbox_id in set(self._samples) - set(live):
            del self._samples[sandbox_id]
        for record in live.values():
            if _sampled(record):
                self._add(record)

    def _add(self, record: SandboxRecord) -> None:
        kept = self._samples.setdefault(record.id, collections.deque(maxlen=SAMPLES_KEPT))
        try:
            kept.append(sample(record, kept[-1] if kept else None))
        except (OSError, ValueError) as exc:  # it ended meanwhile
            log.debug("could not sample %s: %s", record.id, exc)

    def start(self) -> None:
        """Sample every few seconds until `stop`."""
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.sample_all)
            await asyncio.sleep(SAMPLE_EVERY)


def _sampled(record: SandboxRecord) -> bool:
    return record.alive and record.state in (SandboxState.RUNNING, SandboxState.PAUSED)
