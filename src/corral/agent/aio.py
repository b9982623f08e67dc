"""The agent's event loop: the part of asyncio it uses, on epoll, without asyncio.

`import asyncio` is most of a guest agent's start (about 18 ms of a namespaces sandbox's cold
start on the reference machine) and most of an idle agent's private memory (about 5 MiB): it
brings `logging`, `inspect`, `concurrent.futures`, `typing` and the event loop's many
options. The agent needs futures, tasks, timers, readiness callbacks on descriptors, one
signal, an event, a lock, a queue and plain socket streams. This module gives it those, with
asyncio's names and meanings (coroutines with `await`, cancellation thrown into the awaiting
coroutine as `CancelledError`), so the agent reads as asyncio code (docs/performance.md).

Standard library only (Python >= 3.8), as the whole agent; one loop per process, in its main thread.
"""

from __future__ import annotations

import os
import select
import sys
import time

try:
    from corral.agent.lean import deque, heapify, heappop, heappush, signal
except ImportError:  # inside the sandbox the agent directory itself is on sys.path
    from lean import deque, heapify, heappop, heappush, signal  # type: ignore[import-not-found,no-redef]

# `typing` is for the type checker only: 2 ms of every agent's start (docs/performance.md).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import (
        Any,
        Callable,
        Coroutine,
        Deque,
        Dict,
        Generator,
        Iterable,
        List,
        Optional,
        Set,
        Tuple,
        TypeVar,
        Union,
    )
    from typing import Generic as Generic  # noqa: PLC0414 - re-exported, for aiosync

    T = TypeVar("T")
else:
    T = None

    class Generic:
        def __class_getitem__(cls, item):
            return cls


FIRST_COMPLETED = "FIRST_COMPLETED"
FIRST_EXCEPTION = "FIRST_EXCEPTION"
ALL_COMPLETED = "ALL_COMPLETED"
# One read of a stream's socket. asyncio's 256 KiB is past glibc's threshold for a heap
# allocation: each read would map a buffer, shrink it and unmap it, three memory-map changes
# that gVisor's Sentry makes slowly (docs/performance.md).
READ_SIZE = 65536
HIGH_WATER = 65536  # a writer's drain() waits while more than this is unsent
LOW_WATER = 16384
MAX_SELECT = 86400.0
READ = select.EPOLLIN
WRITE = select.EPOLLOUT
PAUSE_READING = 2 * 65536  # a stream stops reading its socket while this much is unread


class CancelledError(BaseException):
    """Thrown into a coroutine whose task was cancelled."""


class InvalidStateError(Exception):
    pass


class IncompleteReadError(EOFError):
    def __init__(self, partial: bytes, expected: int) -> None:
        super().__init__("%d bytes read on a total of %d expected bytes" % (len(partial), expected))
        self.partial = partial
        self.expected = expected


class Handle:
    """A callback the loop will run (once, or on each readiness of a descriptor)."""

    __slots__ = ("args", "callback", "cancelled", "when")

    def __init__(self, callback: Callable[..., Any], args: Tuple[Any, ...], when: float = 0.0):
        self.callback = callback
        self.args = args
        self.cancelled = False
        self.when = when

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: "Handle") -> bool:
        return self.when < other.when

    def run(self) -> None:
        try:
            self.callback(*self.args)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # one callback's bug must not stop the agent
            sys.stderr.write("corral agent: %r failed: %r\n" % (self.callback, exc))


class Loop:
    """Ready callbacks, timers and an epoll set; the callbacks run one at a time."""

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.watched: Dict[int, Tuple[Optional[Handle], Optional[Handle]]] = {}  # fd: callbacks
        self.ready: Deque[Handle] = deque()
        self.timers: List[Handle] = []
        self.signals: Dict[int, Handle] = {}
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.add_reader(self.wake_r, self._read_signals)

    def time(self) -> float:
        return time.monotonic()

    def close(self) -> None:
        self.epoll.close()
        os.close(self.wake_r)
        os.close(self.wake_w)

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> Handle:
        handle = Handle(callback, args)
        self.ready.append(handle)
        return handle

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Handle:
        handle = Handle(callback, args, self.time() + delay)
        heappush(self.timers, handle)
        if len(self.timers) > 64 and len(self.timers) > 2 * sum(
            1 for h in self.timers if not h.cancelled
        ):  # long timeouts cancelled early (every command's) would otherwise pile up
            self.timers = [h for h in self.timers if not h.cancelled]
            heapify(self.timers)
        return handle

    def create_future(self) -> "Future[Any]":
        return Future(self)

    def create_task(self, coro: Coroutine[Any, Any, T]) -> "Task[T]":
        return Task(coro, self)

    # -- descriptors ------------------------------------------------------------------------

    def _watch(self, fd: int, event: int, handle: Optional[Handle]) -> None:
        """Make `handle` the callback of `fd`'s readiness `event` (READ or WRITE), or none."""
        reader, writer = self.watched.get(fd, (None, None))
        old = reader if event == READ else writer
        if old is not None:
            old.cancel()  # a callback already made ready must not run after its removal
        if event == READ:
            reader = handle
        else:
            writer = handle
        events = (READ if reader else 0) | (WRITE if writer else 0)
        if not events:
            if self.watched.pop(fd, None) is not None:
                try:
                    self.epoll.unregister(fd)
                except OSError:  # closed already, and so gone from the epoll set
                    pass
        elif fd in self.watched:
            try:
                self.epoll.modify(fd, events)
            except FileNotFoundError:  # closed while watched, its number reused: not in the set
                self.epoll.register(fd, events)
            self.watched[fd] = (reader, writer)
        else:
            self.epoll.register(fd, events)
            self.watched[fd] = (reader, writer)

    def add_reader(self, fd: int, callback: Callable[..., Any], *args: Any) -> None:
        self._watch(fd, READ, Handle(callback, args))

    def remove_reader(self, fd: int) -> None:
        self._watch(fd, READ, None)

    def add_writer(self, fd: int, callback: Callable[..., Any], *args: Any) -> None:
        self._watch(fd, WRITE, Handle(callback, args))

    def remove_writer(self, fd: int) -> None:
        self._watch(fd, WRITE, None)

    # -- signals ----------------------------------------------------------------------------

    def add_signal_handler(self, signum: int, callback: Callable[..., Any], *args: Any) -> None:
        """Run `callback` in the loop after `signum` arrives (the signal's number is written to
        the loop's pipe by the interpreter's C handler, which wakes the epoll wait)."""
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        self.signals[signum] = Handle(callback, args)
        signal.signal(signum, lambda *_: None)
        signal.siginterrupt(signum, False)

    def _read_signals(self) -> None:
        data = b""
        while True:  # all of it: a full pipe would drop the next SIGCHLD's byte
            try:
                chunk = os.read(self.wake_r, 4096)
            except (BlockingIOError, InterruptedError):
                break
            data += chunk
            if len(chunk) < 4096:
                break
        for signum in set(data):
            handle = self.signals.get(signum)
            if handle is not None:
                self.ready.append(Handle(handle.callback, handle.args))

    # -- running ----------------------------------------------------------------------------

    def run_until_complete(self, coro: Coroutine[Any, Any, T]) -> T:
        task = self.create_task(coro)
        while not task.done():
            self.run_once()
        return task.result()

    def run_once(self) -> None:
        timers = self.timers
        while timers and timers[0].cancelled:
            heappop(timers)
        timeout: Optional[float] = None
        if self.ready:
            timeout = 0
        elif timers:  # at most a day, as asyncio: epoll refuses a timeout past 24.8 days
            timeout = min(max(0.0, timers[0].when - self.time()), MAX_SELECT)
        for fd, mask in self.epoll.poll(-1 if timeout is None else timeout):
            reader, writer = self.watched.get(fd, (None, None))
            # An error or hang-up wakes both sides, as `selectors` does: each learns which.
            if mask & ~WRITE and reader is not None:
                self.ready.append(reader)
            if mask & ~READ and writer is not None:
                self.ready.append(writer)
        now = self.time()
        while timers and timers[0].when <= now:
            self.ready.append(heappop(timers))
        for _ in range(len(self.ready)):
            handle = self.ready.popleft()
            if not handle.cancelled:
                handle.run()


_loops: List[Loop] = []  # the process's one loop, once made


def get_event_loop() -> Loop:
    """The process's loop, made on first use."""
    if not _loops:
        _loops.append(Loop())
    return _loops[0]


PENDING, DONE, CANCELLED = "pending", "done", "cancelled"


class Future(Generic[T]):
    """A result to come; `await` it from a coroutine run by a `Task`."""

    def __init__(self, loop: Optional[Loop] = None) -> None:
        self.loop = loop or get_event_loop()
        self.state = PENDING
        self._result: Any = None
        self._exception: Optional[BaseException] = None
        self._callbacks: List[Callable[[Any], Any]] = []

    def done(self) -> bool:
        return self.state != PENDING

    def cancelled(self) -> bool:
        return self.state == CANCELLED

    def result(self) -> T:
        if self.state == CANCELLED:
            raise CancelledError()
        if self.state == PENDING:
            raise InvalidStateError("the result is not ready")
        if self._exception is not None:
            raise self._exception
        return self._result  # type: ignore[no-any-return]

    def exception(self) -> Optional[BaseException]:
        if self.state == CANCELLED:
            raise CancelledError()
        return self._exception

    def _finish(self, state: str) -> None:
        self.state = state
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            self.loop.call_soon(callback, self)

    def set_result(self, value: T) -> None:
        if self.state != PENDING:
            raise InvalidStateError("the future is already done")
        self._result = value
        self._finish(DONE)

    def set_exception(self, exc: BaseException) -> None:
        if self.state != PENDING:
            raise InvalidStateError("the future is already done")
        self._exception = exc
        self._finish(DONE)

    def cancel(self) -> bool:
        if self.state != PENDING:
            return False
        self._finish(CANCELLED)
        return True

    def add_done_callback(self, callback: Callable[[Any], Any]) -> None:
        if self.state != PENDING:
            self.loop.call_soon(callback, self)
        else:
            self._callbacks.append(callback)

    def remove_done_callback(self, callback: Callable[[Any], Any]) -> None:
        self._callbacks = [c for c in self._callbacks if c != callback]

    def __await__(self) -> Generator[Any, None, T]:
        if self.state == PENDING:
            yield self  # the task running us waits for this future
        return self.result()


class Task(Future[T]):
    """Runs a coroutine: steps it whenever the future it awaits is done."""

    def __init__(self, coro: Coroutine[Any, Any, T], loop: Optional[Loop] = None) -> None:
        super().__init__(loop)
        self.coro = coro
        self.waiting: Optional[Future[Any]] = None
        self.must_cancel = False
        self.loop.call_soon(self._step, None)

    def cancel(self) -> bool:
        if self.done():
            return False
        if self.waiting is not None and self.waiting.cancel():
            return True  # the coroutine gets CancelledError when it wakes
        self.must_cancel = True
        return True

    def _step(self, exc: Optional[BaseException]) -> None:
        if self.done():
            return
        if self.must_cancel:
            exc = exc if isinstance(exc, CancelledError) else CancelledError()
            self.must_cancel = False
        self.waiting = None
        try:
            awaited = self.coro.send(None) if exc is None else self.coro.throw(exc)
        except StopIteration as stop:
            if self.must_cancel:
                super().cancel()
            else:
                self.set_result(stop.value)
        except CancelledError:
            super().cancel()
        except (KeyboardInterrupt, SystemExit) as exit_exc:
            self.set_exception(exit_exc)
            raise
        except BaseException as error:
            self.set_exception(error)
        else:
            if isinstance(awaited, Future) and awaited is not self:
                self.waiting = awaited
                awaited.add_done_callback(self._wakeup)
                if self.must_cancel and awaited.cancel():
                    self.must_cancel = False
            else:
                wrong = RuntimeError("a task's coroutine yielded %r, not a future" % (awaited,))
                self.loop.call_soon(self._step, wrong)

    def _wakeup(self, future: Future[Any]) -> None:
        try:
            future.result()
        except BaseException as exc:
            self._step(exc)
        else:
            self._step(None)


def ensure_future(awaitable: Union[Future[T], Coroutine[Any, Any, T]]) -> Future[T]:
    if isinstance(awaitable, Future):
        return awaitable
    return get_event_loop().create_task(awaitable)


def release(future: Future[Any], value: Any = None) -> None:
    if not future.done():
        future.set_result(value)


async def sleep(delay: float) -> None:
    loop = get_event_loop()
    future = loop.create_future()
    later = loop.call_later(delay, release, future) if delay > 0 else None
    timer = later or loop.call_soon(release, future)
    try:
        await future
    finally:
        timer.cancel()


async def writable(fd: int) -> None:
    """Return once `fd` can be written to (a pipe or socket with room again), or is given up
    (`wake_writer`: the caller must check that it is still its to write to)."""
    loop = get_event_loop()
    future = loop.create_future()
    loop.add_writer(fd, release, future)
    mine = loop.watched[fd][1]
    try:
        await future
    finally:  # not the writer of a descriptor that reused the number since `wake_writer`
        if loop.watched.get(fd, (None, None))[1] is mine:
            loop.remove_writer(fd)


def wake_writer(fd: int) -> None:
    """Wake who waits in `writable(fd)` and stop watching `fd`, before it is closed."""
    writer = get_event_loop().watched.get(fd, (None, None))[1]
    get_event_loop().remove_writer(fd)
    if writer is not None:
        writer.run()


async def wait(
    awaitables: Iterable[Any], timeout: Optional[float] = None, return_when: str = ALL_COMPLETED
) -> Tuple[Set[Future[Any]], Set[Future[Any]]]:
    """Wait for some or all of `awaitables`; (done, pending), as asyncio.wait."""
    futures = {ensure_future(a) for a in awaitables}
    loop = get_event_loop()
    waiter = loop.create_future()
    left = [len(futures)]

    def on_done(future: Future[Any]) -> None:
        left[0] -= 1
        failed = not future.cancelled() and future.exception() is not None
        if (
            left[0] <= 0
            or return_when == FIRST_COMPLETED
            or (return_when == FIRST_EXCEPTION and failed)
        ):
            release(waiter)

    timer = loop.call_later(timeout, release, waiter) if timeout is not None else None
    for future in futures:
        future.add_done_callback(on_done)
    try:
        if futures:
            await waiter
    finally:
        if timer is not None:
            timer.cancel()
        for future in futures:
            future.remove_done_callback(on_done)
    done = {f for f in futures if f.done()}
    return done, futures - done


async def wait_for(
    awaitable: Union[Future[T], Coroutine[Any, Any, T]], timeout: Optional[float]
) -> T:
    """`awaitable`'s result, or TimeoutError (cancelling it) after `timeout` seconds."""
    future: Future[T] = ensure_future(awaitable)
    if timeout is None:
        return await future
    try:
        done, _ = await wait([future], timeout=timeout)
    except CancelledError:
        future.cancel()
        raise
    if not done:
        future.cancel()
        await wait([future])  # as asyncio: it has finished cancelling when we return
        raise TimeoutError()
    return future.result()


async def gather(*awaitables: Any) -> List[Any]:
    """All their results in order; the first exception, as soon as one fails."""
    futures = [ensure_future(a) for a in awaitables]
    try:
        await wait(futures, return_when=FIRST_EXCEPTION)
    except CancelledError:
        for future in futures:
            future.cancel()
        raise
    for future in futures:
        if future.done() and not future.cancelled() and future.exception() is not None:
            raise future.exception()  # type: ignore[misc]
    return [future.result() for future in futures]
