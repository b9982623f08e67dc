"""Dozing: a running sandbox that has nothing of its own running and has not been used for a
while is frozen, where its runtime burns CPU while idle (`Runtime.freeze_idle`: gVisor's
Sentry wakes every 400 µs, ~2 % of a core per idle sandbox here), and thawed by its next use.

Only a sandbox with no process but its agent dozes: a server, a build or a code interpreter
left running keeps it awake, so freezing never stops anything a user can observe. What may
still be in flight is checked twice, before asking the agent (no use, no open stream, no
change under way) and again, under the sandbox's lock, after its answer.

The next use thaws it: every call to the agent (`AgentLink.waker`), a pause and a checkpoint
(they quiesce the agent's link first) go through the waker, which thaws the cgroup once. A
sandbox left frozen by an engine that stopped (or crashed) is thawed by the next one when it
adopts it (`corral.engine.adoption`), so that its agent can dial in.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time

from corral.agent import protocol as P
from corral.core.errors import CorralError, SandboxFailed
from corral.engine.record import Phase, SandboxRecord
from corral.engine.registry import Registry
from corral.engine.runtime_set import RuntimeSet
from corral.engine.tasks import Tasks

log = logging.getLogger("corral.engine")

DOZE_AFTER = 10.0  # seconds unused (and nothing of its own running) before a sandbox dozes
CENSUS_TIMEOUT = 5.0  # seconds the agent has to say what runs beside it
BUSY_RECHECK = 60.0  # seconds before asking again an unused sandbox that had something running


class Doze:
    """Freezes idle sandboxes of the runtimes that need it; their next use thaws them."""

    def __init__(
        self, registry: Registry, runtimes: RuntimeSet, tasks: Tasks, after: float | None
    ) -> None:
        self._registry = registry
        self._runtimes = runtimes
        self._tasks = tasks
        self.after = after  # None or 0: never
        self._asking: set[str] = set()  # sandboxes whose agent is being asked
        # sandbox -> (its last use, time.monotonic()) when something of its own was running
        self._busy: dict[str, tuple[float, float]] = {}

    def check(self, now: float) -> None:
        """Ask the agents of sandboxes idle long enough what runs beside them (from the
        supervisor's rounds; `now` is `time.monotonic()`)."""
        if not self.after:
            return
        for record in self._registry:
            if (
                self._may_doze(record)
                and record.id not in self._asking
                and not record.lock.locked()
                and self._quiet(record, now)
                and not self._still_busy(record, now)
            ):
                self._asking.add(record.id)
                task = self._tasks.spawn(self._try(record))
                task.add_done_callback(functools.partial(self._asked, record.id))
        for sandbox_id in list(self._busy):
            found = self._registry.find(sandbox_id)
            if found is None or not found.alive:
                del self._busy[sandbox_id]

    def _still_busy(self, record: SandboxRecord, now: float) -> bool:
        """Found running something of its own, not used since, and asked recently: what runs
        in the background may end by itself (a job), so unused ones are asked again later."""
        used, asked = self._busy.get(record.id, (None, 0.0))
        return used == record.last_active and now - asked < BUSY_RECHECK

    def _asked(self, sandbox_id: str, _task: asyncio.Task[None]) -> None:
        self._asking.discard(sandbox_id)

    def _may_doze(self, record: SandboxRecord) -> bool:
        return (
            record.phase is Phase.RUNNING
            and record.claimed
            and self._runtimes.get(record.runtime).freeze_idle
        )

    def _quiet(self, record: SandboxRecord, now: float) -> bool:
        """Unused for `after` seconds, nothing attached or in flight, not dozing already."""
        return (
            record.link.waker is None
            and not record.holds
            and record.link.connected
            and not record.link.streams
            and now - record.last_active >= (self.after or 0)
        )

    async def _try(self, record: SandboxRecord) -> None:
        """Freeze `record` if its agent has nothing running beside it and nobody used it
        meanwhile."""
        used = record.last_active
        try:
            async with asyncio.timeout(CENSUS_TIMEOUT):
                answer = await record.link.call(P.PING, {})
        except (TimeoutError, CorralError):
            answer = {}  # busy, ending, or an old agent: as if something ran
        if answer.get("others") != 0:  # something of its own runs, or an agent that cannot say
            self._busy[record.id] = (used, time.monotonic())  # ask again later, not every round
            return
        async with record.lock:  # no pause, checkpoint or end begins while it freezes
            if (
                record.last_active != used
                or not self._may_doze(record)
                or not self._quiet(record, time.monotonic())
            ):
                return
            await self._freeze(record)

    async def _freeze(self, record: SandboxRecord) -> None:
        runtime = self._runtimes.get(record.runtime)
        thawed = asyncio.Lock()  # held until the freeze is done: a waker waits for it
        await thawed.acquire()
        record.link.waker = functools.partial(self._wake, record, thawed)
        try:
            await asyncio.to_thread(runtime.doze, record.plan)
        except (CorralError, OSError) as exc:
            log.warning("sandbox %s could not doze: %s", record.id, exc)
            self._busy[record.id] = (record.last_active, time.monotonic())
            with contextlib.suppress(CorralError, OSError):  # if this fails, the next use retries
                await asyncio.to_thread(runtime.wake, record.plan)
                record.link.waker = None
        finally:
            thawed.release()

    async def _wake(self, record: SandboxRecord, thawed: asyncio.Lock) -> None:
        """The sandbox's next use: thaw it (once; later callers find it thawed)."""
        async with thawed:
            if record.link.waker is None:
                return
            try:
                if not record.gone:  # (killed frozen: the call finds it gone)
                    await asyncio.to_thread(self._runtimes.get(record.runtime).wake, record.plan)
            except (CorralError, OSError) as exc:
                if not record.gone:  # the next use tries again
                    raise SandboxFailed(
                        f"sandbox {record.id} could not be thawed: {exc}", code="thaw_failed"
                    ) from exc
            record.link.waker = None
