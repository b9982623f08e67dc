"""Bounded thread pools, one per kind of slow blocking work.

`asyncio.to_thread` runs everything on one small pool (six threads on two cores): a few slow
registry pulls would hold every thread, and creates and terminates, which use the same pool,
would wait behind them. Work that can take minutes and that a tenant can start at will runs in
a lane of its own instead, so it can only queue behind its own kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class Lane:
    """A thread pool of `workers` threads for one kind of work."""

    def __init__(self, name: str, workers: int) -> None:
        self.name = name
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None

    async def run(self, func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """`func(*args, **kwargs)` in one of the lane's threads, once one is free."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=f"corral-{self.name}")
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._pool, functools.partial(func, *args, **kwargs))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # A thread cannot be stopped: the caller stays until it is free, so that what
            # counts the caller's work (a key's builds in flight) counts it until then.
            with contextlib.suppress(Exception):
                await future
            raise


# Image work a tenant starts: registry pulls, archive reads, unpacking, walks of the store.
IMAGES = Lane("images", 4)
