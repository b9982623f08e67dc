"""How many sandboxes start at once (`StartGate`)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
from collections import deque
from collections.abc import AsyncIterator

from corral.host import cgroups

STARTS_PER_CPU = 2  # runtimes starting at once per CPU (a start is mostly CPU: runsc, Python)


def default_limit() -> int:
    """`STARTS_PER_CPU` per CPU this process may run on (its affinity, or its cgroup's CPU
    quota where that is less: a container's limit), at least 2."""
    cpus: float = len(os.sched_getaffinity(0))
    cpus = min(cpus, cgroups.cpu_limit() or cpus)
    return max(2, math.ceil(STARTS_PER_CPU * cpus))


class StartGate:
    """Bounds the sandboxes whose runtimes start (or restore) at once.

    A start is mostly CPU (a runtime's processes, the guest agent's Python): a burst of them
    all started together on a few cores makes every one slow, past the agent's timeout, where
    taken a few at a time most finish early. A start waits its turn before its agent's timer
    starts. Turns are first come, first served, urgent starts (one someone waits for: a
    create, a wake) before the others (a pool's refill, a boot image); a freed place is
    handed to the next waiter directly, so no newcomer overtakes it."""

    def __init__(self, limit: int | None) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"a start limit is 1 or more, or None for no bound (not {limit})")
        self.limit = limit
        self.running = 0
        self._waiting: dict[bool, deque[asyncio.Future[None]]] = {True: deque(), False: deque()}

    @property
    def urgent_waiting(self) -> int:
        return len(self._waiting[True])

    @contextlib.asynccontextmanager
    async def turn(self, *, urgent: bool) -> AsyncIterator[None]:
        """Hold one of the gate's places while the block runs."""
        ahead = self._waiting[True] or (not urgent and self._waiting[False])
        if self._room() and not ahead:
            self.running += 1
        else:
            place = asyncio.get_running_loop().create_future()
            self._waiting[urgent].append(place)
            try:
                await place
            except asyncio.CancelledError:
                if place.cancelled():  # leave the line (a release may have passed it over)
                    with contextlib.suppress(ValueError):
                        self._waiting[urgent].remove(place)
                else:  # handed a place at the moment it was cancelled: hand it on
                    self._release()
                raise
        try:
            yield
        finally:
            self._release()

    def _room(self) -> bool:
        return self.limit is None or self.running < self.limit

    def _release(self) -> None:
        self.running -= 1
        while self._room() and (line := self._waiting[True] or self._waiting[False]):
            place = line.popleft()
            if not place.done():
                self.running += 1
                place.set_result(None)
