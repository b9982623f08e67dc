"""A sandbox ready for use: found, woken or resumed if it sleeps and may be, and running."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator

from corral.core.errors import InvalidState
from corral.core.models import SandboxInfo
from corral.core.state import SandboxState
from corral.engine.record import SandboxRecord
from corral.engine.registry import Registry

Wake = Callable[[SandboxRecord], Awaitable[SandboxInfo]]


class Access:
    """Hands out running sandboxes to the engine's users, and notes each use.

    A use resumes a paused sandbox and wakes a hibernated one first, unless its spec says
    `auto_resume=False`; every use restarts its idle time. `last_use` is when any sandbox was
    last used, so pools refill in the gaps of live traffic.
    """

    def __init__(self, registry: Registry, resume: Wake, wake: Wake) -> None:
        self._registry = registry
        self._resume = resume
        self._wake = wake
        self.last_use = 0.0  # time.monotonic() of the last use of any sandbox

    def running(self, sandbox_id: str, action: str, *, use: bool = True) -> SandboxRecord:
        """The sandbox, if it is running; else `InvalidState` naming `action`. Counted as a
        use unless `use` is false (a check that must not keep the sandbox awake)."""
        record = self._registry.get(sandbox_id)
        record.require(action, SandboxState.RUNNING)
        if use:
            self.last_use = time.monotonic()
            record.touch()
        return record

    async def use(self, sandbox_id: str, action: str) -> SandboxRecord:
        """The running sandbox, resumed or woken first if it sleeps and may. A change under
        way (a snapshot, which hangs up the agent's link for its moment; a hibernation; a
        pause) finishes first, so the call sees where it left the sandbox."""
        record = self._registry.get(sandbox_id)
        if record.lock.locked():
            async with record.lock:
                pass
        if record.spec.auto_resume and not record.ending:
            with contextlib.suppress(InvalidState):  # someone else woke it meanwhile
                if record.state is SandboxState.PAUSED:
                    await self._resume(record)
                elif record.state is SandboxState.HIBERNATED:
                    await self._wake(record)
        return self.running(sandbox_id, action)

    @contextlib.contextmanager
    def active(self, sandbox_id: str) -> Iterator[None]:
        """Count the sandbox as in use for as long as the block runs (an attached stream)."""
        record = self._registry.get(sandbox_id)
        record.holds += 1
        record.touch()
        try:
            yield
        finally:
            record.holds -= 1
            record.touch()
