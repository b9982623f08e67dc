"""The guest agent's event loop (`corral.agent.aio`, `aiosync`, `aiostreams`), in this process.

The agent's protocol tests (test_agent.py) and every sandbox test run it for real; these pin
the asyncio meanings the agent relies on, where a mistake would hang or lose data rather than
fail loudly: cancellation, timeouts, hand-offs of a lock and a queue's items, flow control.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from corral.agent import aio, aiostreams, aiosync, contexts

T = TypeVar("T")


@pytest.fixture(name="loop", autouse=True)
def fresh_loop() -> Iterator[aio.Loop]:
    """A loop of its own for each test, the process's loop while it runs."""
    fresh = aio.Loop()
    aio._loops[:] = [fresh]
    yield fresh
    aio._loops.clear()
    fresh.close()


def run(loop: aio.Loop, coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to its end (pytest's timeout catches a hang)."""
    task = loop.create_task(coro)
    for _ in range(100_000):
        if task.done():
            return task.result()
        loop.run_once()
    raise AssertionError("the coroutine did not finish")


def test_a_cancelled_task_gets_cancelled_error_where_it_waits(loop: aio.Loop) -> None:
    seen: list[str] = []

    async def sleeper() -> None:
        try:
            await aio.sleep(60)
        except aio.CancelledError:
            seen.append("cancelled")
            raise
        finally:
            seen.append("finally")

    async def main() -> bool:
        task = loop.create_task(sleeper())
        await aio.sleep(0)
        task.cancel()
        await aio.wait([task])
        return task.cancelled()

    assert run(loop, main()) is True
    assert seen == ["cancelled", "finally"]
    assert [t for t in loop.timers if not t.cancelled] == []  # the sleep's timer went with it


def test_wait_for_times_out_and_has_cancelled_the_awaitable_when_it_returns(
    loop: aio.Loop,
) -> None:
    cleaned: list[bool] = []

    async def slow() -> int:
        try:
            await aio.sleep(60)
        finally:
            cleaned.append(True)
        return 1

    async def fast() -> int:
        await aio.sleep(0.001)
        return 7

    async def main() -> int:
        with pytest.raises(TimeoutError):
            await aio.wait_for(slow(), 0.01)
        assert cleaned == [True]
        return await aio.wait_for(fast(), 5)

    assert run(loop, main()) == 7


def test_wait_returns_at_the_first_completion_or_at_its_timeout(loop: aio.Loop) -> None:
    async def after(delay: float) -> float:
        await aio.sleep(delay)
        return delay

    async def main() -> None:
        quick, slow = loop.create_task(after(0.001)), loop.create_task(after(60))
        done, pending = await aio.wait([quick, slow], return_when=aio.FIRST_COMPLETED)
        assert done == {quick} and pending == {slow}
        done, pending = await aio.wait([slow], timeout=0.01)
        assert done == set() and pending == {slow}
        slow.cancel()

    run(loop, main())


def test_gather_raises_the_first_failure_without_waiting_for_the_rest(loop: aio.Loop) -> None:
    async def fail() -> None:
        await aio.sleep(0.001)
        raise ValueError("broken")

    async def main() -> None:
        forever = loop.create_task(aio.sleep(60))
        with pytest.raises(ValueError, match="broken"):
            await aio.gather(forever, fail())
        assert not forever.done()
        forever.cancel()
        assert await aio.gather(aio.sleep(0), aio.sleep(0)) == [None, None]

    run(loop, main())


def test_a_lock_is_handed_in_turn_and_passed_on_by_a_waiter_cancelled_holding_it(
    loop: aio.Loop,
) -> None:
    lock = aiosync.Lock()
    order: list[str] = []

    async def take(name: str) -> None:
        async with lock:
            order.append(name)
            await aio.sleep(0)

    async def main() -> None:
        await lock.acquire()
        first = loop.create_task(take("first"))
        second = loop.create_task(take("second"))
        await aio.sleep(0)
        lock.release()  # handed to `first`...
        first.cancel()  # ...which is cancelled before it runs: it must hand the lock on
        await aio.wait([first, second])
        assert first.cancelled()
        assert not lock.locked()

    run(loop, main())
    assert order == ["second"]


def test_a_queue_item_is_not_lost_when_the_getter_it_woke_is_cancelled(loop: aio.Loop) -> None:
    queue: aiosync.Queue[int] = aiosync.Queue()

    async def main() -> int:
        first = loop.create_task(queue.get())
        second = loop.create_task(queue.get())
        await aio.sleep(0)
        queue.put_nowait(1)  # wakes `first`...
        first.cancel()  # ...cancelled before it takes the item
        done, _ = await aio.wait([second], timeout=5)
        assert first.cancelled() and done == {second}
        return second.result()

    assert run(loop, main()) == 1


def test_a_waiter_cancelled_after_the_lock_passed_it_over_gets_cancelled_error(
    loop: aio.Loop,
) -> None:
    lock = aiosync.Lock()

    async def main() -> None:
        await lock.acquire()
        waiting = loop.create_task(lock.acquire())
        await aio.sleep(0)
        waiting.cancel()  # its future is cancelled; the task has not run since
        lock.release()  # passes over the cancelled waiter
        await aio.wait([waiting])
        assert waiting.cancelled()  # not a ValueError from the waiters' deque
        assert not lock.locked()

    run(loop, main())


def test_an_event_wakes_every_waiter(loop: aio.Loop) -> None:
    event = aiosync.Event()

    async def main() -> list[Any]:
        waiters = [loop.create_task(event.wait()) for _ in range(3)]
        await aio.sleep(0)
        assert not any(w.done() for w in waiters)
        event.set()
        return await aio.gather(*waiters)

    assert run(loop, main()) == [True, True, True]


def test_a_failing_callback_does_not_stop_the_loop(
    loop: aio.Loop, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken() -> None:
        raise RuntimeError("bug")

    async def main() -> str:
        loop.call_soon(broken)
        await aio.sleep(0.001)
        return "alive"

    assert run(loop, main()) == "alive"
    assert "bug" in capsys.readouterr().err


def test_cancelled_timers_do_not_pile_up(loop: aio.Loop) -> None:
    for _ in range(1000):  # as every command with a long timeout that ends early
        loop.call_later(3600, lambda: None).cancel()
    assert len(loop.timers) <= 130


def test_a_removed_reader_made_ready_in_the_same_turn_does_not_run(loop: aio.Loop) -> None:
    """A callback that closes another descriptor removes its reader first: the reader must
    not run afterwards on a closed (or reused) descriptor number."""
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    calls: list[str] = []

    def on_a() -> None:
        calls.append("a")
        loop.remove_reader(a.fileno())
        loop.remove_reader(c.fileno())

    def on_c() -> None:
        calls.append("c")
        loop.remove_reader(c.fileno())
        loop.remove_reader(a.fileno())

    loop.add_reader(a.fileno(), on_a)
    loop.add_reader(c.fileno(), on_c)
    b.send(b"x")
    d.send(b"x")
    loop.run_once()
    assert len(calls) == 1
    for sock in (a, b, c, d):
        sock.close()


def _full_pipe() -> tuple[int, int]:
    read, write = os.pipe()
    os.set_blocking(write, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(write, b"x" * 65536)
    return read, write


def test_a_writer_woken_before_its_descriptor_closes_returns_and_leaves_the_reused_number_watched(
    loop: aio.Loop,
) -> None:
    """A STDIN frame waits for room in a pipe nobody reads, and its command ends: the frame is
    woken (it would otherwise wait for ever, holding its data), and once it runs, the number
    of the closed pipe, reused meanwhile and watched by another writer, stays watched."""
    read, write = _full_pipe()
    waiting = loop.create_task(aio.writable(write))
    loop.run_once()
    assert not waiting.done() and write in loop.watched
    aio.wake_writer(write)
    os.close(write)
    reused = os.dup(read)  # the lowest free number: the one just closed
    assert reused == write
    others: list[str] = []
    loop.add_writer(reused, others.append, "other")
    run(loop, aio.wait_for(waiting, 5))
    assert loop.watched[reused][1] is not None  # the other writer is still there
    loop.remove_writer(reused)
    for fd in (read, reused):
        os.close(fd)


def test_a_number_closed_while_watched_and_reused_can_be_watched_again(loop: aio.Loop) -> None:
    """The kernel drops a closed descriptor from the epoll set without an event, so the loop
    may still list it; the descriptor that reuses its number must be watchable (it was an
    ENOENT from `epoll.modify`), and its readiness must be seen."""
    read, write = os.pipe()
    loop.add_reader(read, lambda: None)
    os.close(read)
    reused, other_write = os.pipe()
    assert reused == read
    seen: list[str] = []
    loop.add_reader(reused, seen.append, "readable")
    os.write(other_write, b"x")
    for _ in range(10):
        loop.run_once()
        if seen:
            break
    assert seen == ["readable"]
    loop.remove_reader(reused)
    for fd in (write, reused, other_write):
        os.close(fd)


def test_a_code_request_stuck_on_a_full_pipe_ends_when_its_context_stops(loop: aio.Loop) -> None:
    """A request to a kernel that does not read (still starting, or busy) waits for room in
    its pipe; the context's restart or removal stops it, and the request must end rather
    than wait for ever on a closed descriptor, holding the context's lock."""
    context = contexts.Context("c-1", {}, {"PATH": os.defpath})
    read, write = _full_pipe()
    context.requests = write
    writing = loop.create_task(context._write(b"y" * 65536))
    loop.run_once()
    assert not writing.done() and write in loop.watched
    context.stop()
    run(loop, aio.wait_for(writing, 5))
    assert context.requests == -1 and write not in loop.watched
    os.close(read)


def streams() -> tuple[aiostreams.StreamReader, aiostreams.StreamWriter, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    connection = aiostreams.Connection(ours)
    return aiostreams.StreamReader(connection), aiostreams.StreamWriter(connection), theirs


def test_drain_waits_while_the_peer_does_not_read(loop: aio.Loop) -> None:
    _, writer, theirs = streams()
    payload = b"x" * (4 << 20)

    async def main() -> None:
        writer.write(payload)
        drained = loop.create_task(writer.drain())
        await aio.sleep(0.01)
        assert not drained.done()  # the socket's buffer is full, the rest waits here
        received = bytearray()
        theirs.setblocking(False)
        while len(received) < len(payload):
            try:
                received += theirs.recv(1 << 20)
            except BlockingIOError:
                await aio.sleep(0.001)
        await aio.wait_for(drained, 5)
        assert bytes(received) == payload

    run(loop, main())
    writer.close()
    theirs.close()


def test_a_reader_stops_reading_past_its_limit_and_resumes_as_it_is_read(loop: aio.Loop) -> None:
    reader, writer, theirs = streams()
    theirs.setblocking(False)
    sent = 0
    with pytest.raises(BlockingIOError):
        while True:
            sent += theirs.send(b"y" * 65536)

    async def main() -> int:
        await aio.sleep(0.01)
        connection = reader.connection
        assert not connection.reading  # paused: nothing more is taken from the socket
        assert len(connection.buffer) <= aio.PAUSE_READING + aio.READ_SIZE
        got = 0
        while got < sent:
            got += len(await reader.read(1 << 20))
        return got

    assert run(loop, main()) == sent
    writer.close()
    theirs.close()


def test_a_read_larger_than_the_pause_limit_arrives_whole(loop: aio.Loop) -> None:
    """A frame larger than what a reader buffers before it stops reading (a CALL carrying
    300 KB of code) must not leave the reader waiting on a paused socket."""
    reader, writer, theirs = streams()
    theirs.setblocking(False)
    payload = os.urandom(3 * aio.PAUSE_READING)

    async def main() -> bytes:
        receiving = loop.create_task(reader.readexactly(len(payload)))
        view = memoryview(payload)
        while view:
            try:
                view = view[theirs.send(view) :]
            except BlockingIOError:
                await aio.sleep(0.001)
        return await aio.wait_for(receiving, 10)

    assert run(loop, main()) == payload
    writer.close()
    theirs.close()


def test_a_timer_weeks_away_does_not_break_the_loop(loop: aio.Loop) -> None:
    """epoll refuses a timeout past 24.8 days: the loop waits at most a day at a time."""
    a, b = socket.socketpair()
    seen: list[bytes] = []
    loop.call_later(30 * 86400, seen.append, b"never")
    loop.add_reader(a.fileno(), lambda: seen.append(a.recv(10)))
    b.send(b"x")
    loop.run_once()
    assert seen == [b"x"]
    loop.remove_reader(a.fileno())
    a.close()
    b.close()


def test_readexactly_at_the_end_raises_with_what_came(loop: aio.Loop) -> None:
    reader, writer, theirs = streams()
    theirs.sendall(b"abc")
    theirs.shutdown(socket.SHUT_WR)

    async def main() -> None:
        assert await reader.readexactly(2) == b"ab"
        with pytest.raises(aio.IncompleteReadError) as short:
            await reader.readexactly(5)
        assert short.value.partial == b"c" and short.value.expected == 5
        assert await reader.read(10) == b""

    run(loop, main())
    writer.close()
    theirs.close()


def test_write_eof_half_closes_and_close_sends_what_is_queued_first(loop: aio.Loop) -> None:
    _, writer, theirs = streams()
    theirs.setblocking(False)

    async def main() -> bytes:
        writer.write(b"z" * (1 << 20))  # more than the socket holds: most of it is queued
        writer.write_eof()
        writer.close()
        received = bytearray()
        while True:
            try:
                chunk = theirs.recv(1 << 20)
            except BlockingIOError:
                await aio.sleep(0.001)
                continue
            if not chunk:  # the end, after everything
                return bytes(received)
            received += chunk

    assert run(loop, main()) == b"z" * (1 << 20)
    assert writer.connection.lost is not None  # closed once all had gone
    theirs.close()


def test_connecting_to_a_closed_port_is_an_os_error(loop: aio.Loop) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # free, and nothing listens on it

    async def main() -> None:
        with pytest.raises(OSError) as refused:
            await aiostreams.open_connection("127.0.0.1", port)
        assert refused.value.errno == errno.ECONNREFUSED

    run(loop, main())
