"""Who owns each new sandbox, durable before its create is answered, without waiting for the
store: one line appended to a file (a write to the page cache, which outlives a killed server).

The store stays the record of owners; its writes are queued off the request path (see
`Service`). A server killed before the store had a new sandbox finds the owner here when it
restarts, instead of ending a sandbox it had already handed out. Once the store has caught up
with every queued write the file is emptied, so it only ever holds the last few creates.
"""

from __future__ import annotations

import os
from pathlib import Path


class OwnerJournal:
    """An append-only file of `owner sandbox` lines, emptied whenever the store has them all."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1
        self._dirty = False

    def open(self) -> dict[str, str]:
        """What a previous server wrote and may not have stored: sandbox id -> owner key id."""
        found: dict[str, str] = {}
        if self.path.exists():
            for line in self.path.read_text(errors="replace").splitlines():
                fields = line.split()
                if len(fields) == 2:  # the last line of a crash may be cut short
                    found[fields[1]] = fields[0]
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        self._fd = os.open(self.path, flags, 0o600)
        self._dirty = bool(found)
        return found

    def add(self, owner: str, sandbox_id: str) -> None:
        """Record the owner of a sandbox about to be handed out (ids hold no spaces)."""
        os.write(self._fd, f"{owner} {sandbox_id}\n".encode())
        self._dirty = True

    def clear(self) -> None:
        """Forget everything: the store has it now."""
        if self._dirty:
            os.ftruncate(self._fd, 0)
            self._dirty = False

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
