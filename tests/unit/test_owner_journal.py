"""The owner journal: what makes an answered create durable before the store has it."""

from __future__ import annotations

import stat
from pathlib import Path

from corral.server.owners import OwnerJournal


def test_owners_written_are_found_by_the_next_server(tmp_path: Path) -> None:
    path = tmp_path / "owners.journal"
    journal = OwnerJournal(path)
    assert journal.open() == {}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    journal.add("key-a", "sb-1")
    journal.add("key-b", "sb-2")
    journal.close()  # as a killed server would leave it
    with path.open("a") as file:
        file.write("key-c")  # a line cut short by the crash
    again = OwnerJournal(path)
    assert again.open() == {"sb-1": "key-a", "sb-2": "key-b"}
    again.clear()
    assert path.stat().st_size == 0
    again.add("key-d", "sb-3")
    again.clear()
    again.close()
    assert OwnerJournal(path).open() == {}


def test_clearing_a_clean_journal_touches_nothing(tmp_path: Path) -> None:
    journal = OwnerJournal(tmp_path / "owners.journal")
    journal.open()
    before = (tmp_path / "owners.journal").stat().st_mtime_ns
    journal.clear()
    assert (tmp_path / "owners.journal").stat().st_mtime_ns == before
    journal.close()
