"""The audit log's parts on their own: the table (written, queried, pruned), what a command's
entry keeps, and the digests a replay compares."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from corral.engine.sealing import KeyRing
from corral.server.audit.log import AuditLog
from corral.server.audit.trail import MAX_TEXT, CodeWatch, Digest, bounded, command_detail
from corral.server.metrics import AUDIT_DROPPED
from corral.server.store import Store


def entry(at: float, **fields: Any) -> dict[str, Any]:
    return {
        "at": at, "key_id": "key-a", "client": "127.0.0.1", "request_id": "req-1",
        "operation": "exec", "sandbox_id": "sb-a", "status": None, "exit_code": 0,
        "error": None, "bytes_in": 0, "bytes_out": 3, "duration": 0.01,
        "detail": {"cmd": "true"}, **fields,
    }  # fmt: skip


KEYS = KeyRing([bytes(32)])


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(tmp_path / "corral.db", KEYS)
    yield opened
    await opened.close()


async def test_entries_are_written_queried_and_pruned(store: Store) -> None:
    log = AuditLog(retention=3600)
    await log.start(store.sessions, KEYS)
    now = time.time()
    log.add(entry(now - 7200, detail={"cmd": "old"}))
    for n in range(5):
        log.add(entry(now + n, key_id="key-a" if n % 2 else "key-b", detail={"cmd": f"c{n}"}))
    log.add(entry(now, operation="files.write", sandbox_id="sb-b", detail={"path": "/x"}))
    everything = await log.query()  # waits for what is queued
    assert len(everything) == 7 and [e.id for e in everything] == sorted(e.id for e in everything)
    assert [e.detail["cmd"] for e in await log.query(key_id="key-a", operation="exec")] == [
        "old", "c1", "c3",
    ]  # fmt: skip
    assert [e.detail["path"] for e in await log.query(sandbox_id="sb-b")] == ["/x"]
    assert len(await log.query(since=now + 1, until=now + 3)) == 2
    newest = await log.query(newest_first=True, limit=2)
    assert [e.detail for e in newest] == [{"path": "/x"}, {"cmd": "c4"}]
    after = await log.query(cursor=everything[2].id)
    assert [e.id for e in after] == [e.id for e in everything[3:]]
    async with store.sessions() as session:  # command lines and code are sealed at rest
        stored = list(await session.scalars(text("SELECT detail FROM audit")))
    # Sealed text is base64 (which may hold "c1" by chance), never the JSON of the details.
    assert stored and all(row.startswith("sealed:") and '"cmd"' not in row for row in stored)
    assert await log.prune() == 1  # the entry from two hours ago; retention is one
    assert "old" not in {e.detail.get("cmd") for e in await log.query()}
    await log.close()


async def test_entries_that_follow_each_other_share_a_transaction(store: Store) -> None:
    """Requests one after another (as a client running commands in a loop makes them) do
    not each pay for a commit: the writer lingers for the entries that follow."""
    log = AuditLog(retention=3600)
    transactions = 0
    opened = store.sessions

    def counted() -> Any:
        nonlocal transactions
        transactions += 1
        return opened.begin()

    counting = type("Counting", (), {"begin": staticmethod(counted)})()
    await log.start(counting, KEYS)
    for n in range(20):
        log.add(entry(time.time(), detail={"cmd": f"c{n}"}))
        await asyncio.sleep(0.001)  # a request's own time between entries
    await log.flushed()
    assert transactions < 5
    await log.close()
    async with store.sessions() as session:
        assert await session.scalar(text("SELECT count(*) FROM audit")) == 20


async def test_a_log_turned_off_records_nothing(store: Store) -> None:
    log = AuditLog(retention=0)
    await log.start(store.sessions, KEYS)
    log.add(entry(time.time()))
    assert not log.enabled and await log.prune() == 0
    await log.close()
    on = AuditLog(retention=60)
    await on.start(store.sessions, KEYS)
    assert await on.query() == []
    await on.close()


async def test_a_full_queue_drops_and_counts_rather_than_waiting() -> None:
    log = AuditLog(retention=60)  # never started: nothing takes entries off the queue
    log._queue = asyncio.Queue(2)
    before = AUDIT_DROPPED._value.get()
    for _ in range(5):
        log.add(entry(time.time()))
    assert AUDIT_DROPPED._value.get() - before == 3


def test_a_command_keeps_its_line_and_variable_names_only() -> None:
    detail = command_detail(None, ["env"], {"TOKEN": "secret", "A": "b"}, cwd="/root", stdin=False)
    assert detail == {"argv": ["env"], "env": ["A", "TOKEN"], "cwd": "/root"}
    assert "secret" not in repr(detail)
    many = command_detail("env", None, {f"V{n}": "x" for n in range(500)})
    assert len(many["env"]) == 64
    long = command_detail(None, ["echo", "x" * MAX_TEXT, "tail"], None)
    assert long["cut"] is True and sum(map(len, long["argv"])) == MAX_TEXT
    fits = command_detail(None, ["echo", "x" * 100], None)
    assert "cut" not in fits and fits["argv"][1] == "x" * 100
    shell = command_detail("y" * (MAX_TEXT + 10), None, None)
    assert shell["cut"] is True and len(shell["cmd"]) == MAX_TEXT
    assert bounded("short") == ("short", False)


def test_digests_are_of_the_whole_output_and_excerpts_of_its_start() -> None:
    digest = Digest(keep=4)
    for piece in (b"hel", b"lo ", b"world"):
        digest.add("stdout", piece)
    outcome = digest.outcome("stdout", "stderr")
    assert outcome["stdout_sha256"] == hashlib.sha256(b"hello world").hexdigest()
    assert outcome["stdout_bytes"] == 11 and outcome["stderr_bytes"] == 0
    assert outcome["stderr_sha256"] == hashlib.sha256(b"").hexdigest()
    assert digest.excerpts() == {"stdout": "hell"}


def test_code_outcomes_hold_output_results_and_errors() -> None:
    watch = CodeWatch()
    for event in (
        {"type": "started", "context": "python"},
        {"type": "stdout", "text": "hi\n"},
        {"type": "result", "data": {"text/plain": "42", "image/png": "..."}},
        {"type": "error", "name": "ZeroDivisionError", "value": "x", "traceback": "..."},
        {"type": "end", "execution_count": 1, "timed_out": False},
    ):
        watch.event(event)
    outcome = watch.outcome()
    assert watch.ended and outcome["error"] == "ZeroDivisionError"
    assert outcome["stdout_sha256"] == hashlib.sha256(b"hi\n").hexdigest()
    assert outcome["results_sha256"] == hashlib.sha256(b"42\n").hexdigest()
    late = CodeWatch()
    late.event({"type": "end", "timed_out": True})
    assert late.outcome()["error"] == "timed_out"


def test_the_cli_prints_what_a_tenant_sent_as_plain_text() -> None:
    from rich.console import Console

    from corral.cli._audit import shown

    console = Console(record=True, width=200, force_terminal=True)
    console.print(shown("rm -rf /[bold red]x[/] \x1b[2J\x1b]8;;http://evil\x07link"))
    text = console.export_text()
    assert "\x1b" not in shown("\x1b[2J") and "[bold red]x[/]" in text
    assert "?[2J" in text and "http://evil" in text
