"""What the agent keeps of a code context's output while nobody takes it (`execution.Lines`,
`Execution.raw`): bounded, in order, and read on once taken, in the agent's own loop."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

from corral.agent import aio, execution
from tests.unit.test_agent_aio import fresh_loop  # noqa: F401 - each test's own `loop`


def _spin(loop: aio.Loop, rounds: int = 50) -> None:
    """Run the loop a while without waiting in epoll for what may not come."""
    for _ in range(rounds):
        loop.call_soon(lambda: None)
        loop.run_once()


def test_a_kernel_printing_while_nobody_takes_its_output_is_read_no_further(
    loop: aio.Loop,
) -> None:
    """Code whose thread prints after its execution ended: the agent keeps at most
    MAX_QUEUED messages (and one read's), the kernel then waits to write; once they are
    taken, reading goes on, and every message arrives, in order."""
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    lines = execution.Lines(read, 1 << 20)
    lines.watch()
    wanted = 20_000
    written = 0

    def write_some() -> None:
        nonlocal written
        with contextlib.suppress(BlockingIOError):
            while written < wanted:
                line = json.dumps({"type": "stdout", "text": f"{written:05d}"}) + "\n"
                os.write(write, line.encode())
                written += 1

    write_some()
    _spin(loop)
    write_some()
    _spin(loop)
    assert lines.paused and written < wanted  # the pipe is full and the agent reads no more
    held = lines.ready.qsize()
    assert execution.MAX_QUEUED <= held < execution.MAX_QUEUED + execution.READ_CHUNK // 20
    taken: list[Any] = []

    async def take_all() -> None:
        while len(taken) < wanted:
            taken.append(await lines.next())
            if len(taken) % 100 == 0:
                write_some()
                await aio.sleep(0)

    task = loop.create_task(take_all())
    for _ in range(200_000):
        if task.done():
            break
        write_some()
        _spin(loop, 1)
    task.result()
    assert [m["text"] for m in taken] == [f"{n:05d}" for n in range(wanted)]
    os.close(write)
    _spin(loop)
    assert lines.fd == -1 or not lines.paused
    lines.close()


def test_output_written_around_the_kernel_is_held_only_up_to_what_may_be_sent(
    loop: aio.Loop,
) -> None:
    """A process the code started that floods the kernel's stdout: what waits for the next
    message stays within the stream's limit (and a byte over, for the cut's note)."""
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    run = execution.Execution(send)
    chunk = b"y" * 65536
    for _ in range(200):  # 12.5 MiB, over the 4 MiB limit
        run.raw("stdout", chunk)
    held = sum(len(m["text"]) for m in run.pending)
    assert held == execution.OUTPUT_LIMIT + 1
    for message in run.pending:
        loop.create_task(run.forward(message))
    _spin(loop)
    text = "".join(m["text"] for m in sent)
    assert text.startswith("y" * execution.OUTPUT_LIMIT) and "[output cut" in text


def test_a_kernel_stopped_while_its_output_waits_still_ends_what_follows_it(
    loop: aio.Loop,
) -> None:
    """A context restarted or removed while reading of its kernel is paused: whoever follows
    the execution gets what was read, then the kernel's end, and the descriptor is closed."""
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    lines = execution.Lines(read, 1 << 20)
    lines.watch()
    with contextlib.suppress(BlockingIOError):
        for n in range(100_000):
            os.write(write, (json.dumps({"type": "stdout", "text": str(n)}) + "\n").encode())
    _spin(loop)
    assert lines.paused
    lines.close()
    taken: list[Any] = []

    async def take_all() -> None:
        while (message := await lines.next()) is not None:
            taken.append(message)

    task = loop.create_task(take_all())
    _spin(loop, 20)
    assert task.done() and task.result() is None
    assert len(taken) >= execution.MAX_QUEUED and lines.fd == -1
    lines.close()  # again: no second end
    assert lines.ready.qsize() == 0
    os.close(write)
