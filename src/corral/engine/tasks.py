"""The engine's background tasks: started in one place, their failures logged, all stopped on
close."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

log = logging.getLogger("corral.engine")
T = TypeVar("T")


async def finish_in_thread(call: Callable[[], T]) -> T:
    """`call()` in a worker thread, which a cancellation waits for before it is raised.

    A thread cannot be stopped: a start cancelled half-way (a pool removed while it fills,
    a create abandoned) must undo what the thread built after the thread is done, or the undo
    runs beside the build and the build's mounts outlive it (a disk and an overlay, with no
    record left to find them by)."""
    future = asyncio.ensure_future(asyncio.to_thread(call))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({future})
        if not future.cancelled():
            future.exception()  # retrieved: the cancellation is what the caller gets
        raise


class Tasks:
    """Background tasks that must not be lost: kept referenced, failures logged."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    async def close(self, grace: float = 10.0) -> None:
        """Give what is left `grace` seconds to finish, then cancel it."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)
        for task in list(self._tasks):
            task.cancel()
