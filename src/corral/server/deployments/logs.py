"""A deployment's logs and events, kept on the host so they outlive its sandboxes.

The app's output is copied from the sandbox as it is written (see `runner`), into `log`, which
is rotated to `log.1` past `MAX_LOG_BYTES`, so a chatty or hostile app holds at most twice that
on the host. Events (started, crashed, restarted, slept, updated...) go to `events.jsonl`,
the newest `MAX_EVENTS` kept.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

MAX_LOG_BYTES = 8 * 1024 * 1024
MAX_EVENTS = 200


class LogBook:
    """The logs and events of one deployment, in its own directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._log = directory / "log"
        self._events_file = directory / "events.jsonl"
        self._cursor = directory / "cursor"  # "{sandbox id} {bytes of its log copied}"
        self._grew = asyncio.Condition()
        self.events: list[dict[str, Any]] = self._load_events()

    def _load_events(self) -> list[dict[str, Any]]:
        try:
            lines = self._events_file.read_text().splitlines()[-MAX_EVENTS:]
        except FileNotFoundError:
            return []
        found = []
        for line in lines:
            try:
                found.append(json.loads(line))
            except ValueError:  # cut short by a crash: the rest are fine
                continue
        return found

    def event(self, kind: str, message: str, **extra: Any) -> None:
        entry = {"time": time.time(), "kind": kind, "message": message, **extra}
        self.events = [*self.events[-(MAX_EVENTS - 1) :], entry]
        if len(self.events) == MAX_EVENTS:  # rewrite now and then, appending otherwise
            self._events_file.write_text("".join(json.dumps(e) + "\n" for e in self.events))
        else:
            with self._events_file.open("a") as out:
                out.write(json.dumps(entry) + "\n")

    async def write(self, data: bytes, sandbox_id: str, offset: int) -> None:
        """Append the app's output, copied from `sandbox_id`'s log up to `offset`; readers
        following the log see it at once."""
        if not data:
            return
        with self._log.open("ab") as out:
            out.write(data)
            size = out.tell()
        self._cursor.write_text(f"{sandbox_id} {offset}")
        if size > MAX_LOG_BYTES:
            self._log.replace(self._log.with_suffix(".1"))
        async with self._grew:
            self._grew.notify_all()

    def offset(self, sandbox_id: str) -> int:
        """How much of `sandbox_id`'s log was copied (after a restart: where to go on)."""
        try:
            found, _, offset = self._cursor.read_text().partition(" ")
        except FileNotFoundError:
            return 0
        return int(offset) if found == sandbox_id and offset.isdigit() else 0

    def tail(self, lines: int | None) -> bytes:
        """The last `lines` lines kept (all with None)."""
        kept = b""
        for path in (self._log.with_suffix(".1"), self._log):
            try:
                kept += path.read_bytes()
            except FileNotFoundError:
                continue
        if lines is None:
            return kept
        if lines <= 0:
            return b""
        parts = kept.splitlines(keepends=True)
        return b"".join(parts[-lines:])

    async def follow(self, lines: int | None) -> AsyncIterator[bytes]:
        """The last `lines` lines, then what is written from now on, until cancelled."""
        async with self._grew:
            start = self.tail(lines)
            offset = self._size()
        yield start
        while True:
            async with self._grew:
                while self._size() == offset:
                    await self._grew.wait()
            size = self._size()
            if size < offset:  # rotated: what was written since is the new file's start
                offset = 0
            with self._log.open("rb") as source:
                source.seek(offset)
                data = source.read(size - offset)
            offset += len(data)
            if data:
                yield data

    def _size(self) -> int:
        try:
            return self._log.stat().st_size
        except FileNotFoundError:
            return 0

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
