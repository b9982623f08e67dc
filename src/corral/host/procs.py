"""Host processes as /proc shows them: whether a pid is still the process it was."""

from __future__ import annotations

from pathlib import Path


def process_start_time(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot, /proc/<pid>/stat field 22).

    None if there is no such process or it has already exited (a zombie).
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or parentheses itself.
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        if fields[0] in (b"Z", b"X"):  # field 3, the state: exited, not yet reaped
            return None
        return int(fields[19])  # field 22
    except (IndexError, ValueError):
        return None
