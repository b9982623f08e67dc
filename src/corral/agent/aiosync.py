"""Events, locks and queues for the agent's coroutines (see `aio`), as asyncio's."""

from __future__ import annotations

try:
    from corral.agent.aio import CancelledError, Future, Generic, T, get_event_loop, release
    from corral.agent.lean import deque
except ImportError:  # inside the sandbox the agent directory itself is on sys.path
    from aio import (  # type: ignore[import-not-found,no-redef]
        CancelledError,
        Future,
        Generic,
        T,
        get_event_loop,
        release,
    )
    from lean import deque  # type: ignore[import-not-found,no-redef]

TYPE_CHECKING = False  # `typing` is for annotations only (see aio)
if TYPE_CHECKING:
    from typing import Any, Deque


class Event:
    def __init__(self) -> None:
        self.value = False
        self.waiters: Deque[Future[Any]] = deque()

    def is_set(self) -> bool:
        return self.value

    def set(self) -> None:
        self.value = True
        for waiter in self.waiters:
            release(waiter, True)

    def clear(self) -> None:
        self.value = False

    async def wait(self) -> bool:
        if self.value:
            return True
        waiter = get_event_loop().create_future()
        self.waiters.append(waiter)
        try:
            await waiter
            return True
        finally:
            self.waiters.remove(waiter)


class Lock:
    """Taken in turn: release() hands it to the longest waiter."""

    def __init__(self) -> None:
        self.held = False
        self.waiters: Deque[Future[Any]] = deque()

    def locked(self) -> bool:
        return self.held

    async def acquire(self) -> bool:
        if not self.held:
            self.held = True
            return True
        waiter = get_event_loop().create_future()
        self.waiters.append(waiter)
        try:
            await waiter
        except CancelledError:
            if waiter.cancelled():
                if waiter in self.waiters:  # release() may have passed over it already
                    self.waiters.remove(waiter)
            else:  # handed the lock as it was cancelled: hand it on
                self.release()
            raise
        return True

    def release(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(True)  # still held, now by the waiter
                return
        self.held = False

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc_info: Any) -> None:
        self.release()


class Queue(Generic[T]):
    """Unbounded, first in first out."""

    def __init__(self) -> None:
        self.items: Deque[T] = deque()
        self.getters: Deque[Future[Any]] = deque()

    def qsize(self) -> int:
        return len(self.items)

    def empty(self) -> bool:
        return not self.items

    def put_nowait(self, item: T) -> None:
        self.items.append(item)
        self._wake_one()

    def _wake_one(self) -> None:
        while self.getters:
            getter = self.getters.popleft()
            if not getter.done():
                getter.set_result(None)
                return

    def get_nowait(self) -> T:
        if not self.items:
            raise IndexError("the queue is empty")
        return self.items.popleft()

    async def get(self) -> T:
        while not self.items:
            getter = get_event_loop().create_future()
            self.getters.append(getter)
            try:
                await getter
            except CancelledError:
                if getter.cancelled():
                    if getter in self.getters:
                        self.getters.remove(getter)
                elif self.items:  # woken as it was cancelled: wake another in its place
                    self._wake_one()
                raise
        return self.items.popleft()
