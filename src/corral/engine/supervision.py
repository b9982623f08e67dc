"""The reaper: applies every sandbox's lifetime and idle timeout, and every snapshot's ttl, and
ends sandboxes whose agent has stopped answering.

It sleeps until the next deadline (at most a second) or until woken by a change that may bring
one closer (`wake`). What it decides runs as a background task, one per sandbox at a time.

An agent cannot be stopped or killed from inside under bubblewrap (it is pid 1), but under
gVisor SIGSTOP and SIGKILL reach it. A killed agent ends its sandbox (its runtime exits); a
stopped one would leave every call waiting, so a running sandbox whose agent keeps silent for
`AGENT_SILENCE` while calls wait is pinged, and ended if the ping gets no answer either, as is
one whose agent has not connected for `AGENT_ABSENCE`. Its end says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Any

from corral.agent import protocol as P
from corral.core.errors import AgentUnavailable, CorralError
from corral.core.state import EndReason
from corral.engine.checkpoints import Checkpoints
from corral.engine.doze import Doze
from corral.engine.lifecycle import Lifecycle
from corral.engine.record import Phase, SandboxRecord
from corral.engine.registry import Registry
from corral.engine.tasks import Tasks

log = logging.getLogger("corral.engine")

AGENT_SILENCE = 10.0  # seconds without a frame while a call waits: then the agent is pinged
AGENT_ABSENCE = 30.0  # seconds a running sandbox's agent may stay disconnected


class Supervisor:
    """Ends, pauses or hibernates sandboxes when their lifetime or idle time runs out."""

    def __init__(
        self,
        *,
        registry: Registry,
        lifecycle: Lifecycle,
        checkpoints: Checkpoints,
        tasks: Tasks,
        doze: Doze,
    ) -> None:
        self._registry = registry
        self._doze = doze
        self._lifecycle = lifecycle
        self._checkpoints = checkpoints
        self._tasks = tasks
        self._wake = asyncio.Event()
        self._settling: set[str] = set()  # sandboxes whose deadline is being applied
        self._reaper: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap())

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None

    def wake(self) -> None:
        """Look at the deadlines again now (one may have come closer)."""
        self._wake.set()

    async def _reap(self) -> None:
        while True:
            next_deadline = self._apply_deadlines(time.time())
            self._wake.clear()
            # Not `asyncio.wait_for`: on Python 3.11 it swallows a cancellation that arrives
            # just as the event is set, and `stop` would wait for the reaper forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_deadline - time.time())):
                    await self._wake.wait()

    def _apply_deadlines(self, now: float) -> float:
        """Start what is due; return when to look again."""
        next_deadline = now + 1.0
        for record in self._registry:
            if record.gone or record.id in self._settling:
                continue
            if record.expires_at is not None and record.expires_at <= now:
                self._settle(record, self._lifetime_over(record))
                continue
            if record.expires_at is not None:
                next_deadline = min(next_deadline, record.expires_at)
            idle_at = record.idle_deadline()
            if idle_at is not None and idle_at <= now:
                self._settle(record, self._idle(record))
            elif idle_at is not None:
                next_deadline = min(next_deadline, idle_at)
        self._check_agents()
        self._doze.check(time.monotonic())
        for snapshot_id in self._checkpoints.snapshots.expired(now):
            self._tasks.spawn(self._checkpoints.delete_snapshot(snapshot_id))
        return next_deadline

    def _settle(self, record: SandboxRecord, action: Coroutine[Any, Any, None]) -> None:
        self._settling.add(record.id)
        task = self._tasks.spawn(action)
        task.add_done_callback(lambda _task: self._settling.discard(record.id))

    def _check_agents(self) -> None:
        """Probe silent agents, end absent ones (see the module's docstring)."""
        for record in self._registry:
            if record.phase is not Phase.RUNNING or record.id in self._settling:
                continue
            if record.lock.locked():  # a snapshot or a pause is under way: it hangs up on purpose
                continue
            if record.link.silence() > AGENT_SILENCE:
                self._settle(record, self._probe(record))
            elif record.link.absence() > AGENT_ABSENCE:
                detail = f"the guest agent has not connected for {AGENT_ABSENCE:g} s"
                self._settle(record, self._lifecycle.end(record, EndReason.RUNTIME_ERROR, detail))

    async def _probe(self, record: SandboxRecord) -> None:
        try:
            async with asyncio.timeout(AGENT_SILENCE):
                await record.link.call(P.PING, {})
        except (TimeoutError, AgentUnavailable):
            if record.phase is Phase.RUNNING and not record.lock.locked():
                detail = "the guest agent stopped answering (stopped or killed inside the sandbox)"
                log.warning("ending %s: %s", record.id, detail)
                await self._lifecycle.end(record, EndReason.RUNTIME_ERROR, detail)

    async def _lifetime_over(self, record: SandboxRecord) -> None:
        """The lifetime ran out: end the sandbox, or hibernate it (`on_timeout`) with a fresh
        lifetime for when it wakes."""
        if record.spec.on_timeout == "hibernate":
            try:
                await self._checkpoints.hibernate(record, reason="timeout")
                record.remaining = record.spec.timeout
                record.save()
                return
            except CorralError as exc:
                log.warning("hibernating %s at its timeout failed: %s", record.id, exc)
        await self._lifecycle.end(record, EndReason.TIMEOUT, "lifetime timeout reached")

    async def _idle(self, record: SandboxRecord) -> None:
        """Nothing used the sandbox for its idle_timeout: pause, hibernate or end it."""
        action = record.spec.on_idle
        reason = f"idle for {record.spec.idle_timeout:g} s"
        try:
            if action == "terminate":
                await self._lifecycle.end(record, EndReason.IDLE, reason)
            elif action == "hibernate":
                await self._checkpoints.hibernate(record, reason="idle")
            else:
                await self._lifecycle.pause(record, reason="idle")
        except CorralError as exc:  # it changed state meanwhile, or the runtime refused
            log.warning("idle %s of %s failed: %s", action, record.id, exc)
            record.touch()  # not again at once
