"""Which processes in the sandbox belong to a command, and how to end them all at once.

Every command starts as the leader of a session of its own and as a child subreaper
(`procs.spawn`): while it runs, a process it started that detaches (a double fork, `setsid -f`,
a daemon) is re-parented to it instead of to the agent. So its family, while it runs, is every
descendant of the leader, every process of its session, and their descendants. Once the leader
has exited, what it left running is on its own (the sandbox's, like `nohup server &`);
`kill_all` ends everything but the agent.

Ending is freeze-then-kill: every member is stopped (a stopped process cannot fork) until a scan
finds no new one, then all are killed, and again until a scan finds nobody, so a fork bomb
cannot outrun it.

Standard library only, for any Python >= 3.8, like the rest of the agent.
"""

from __future__ import annotations

import os
import time

try:
    from corral.agent.lean import signal
except ImportError:  # inside the sandbox the agent directory itself is on sys.path
    from lean import signal  # type: ignore[import-not-found,no-redef]

TYPE_CHECKING = False  # `typing` is for annotations only: 2 ms of every agent's start (aio)
if TYPE_CHECKING:
    from typing import Callable, Dict, Iterable, Set

MAX_ROUNDS = 64  # freeze scans before killing what was found anyway; kill rounds
SETTLE = 0.005  # seconds between kill rounds
PR_SET_CHILD_SUBREAPER = 36


class Entry:
    __slots__ = ("ppid", "sid")

    def __init__(self, ppid: int, sid: int) -> None:
        self.ppid = ppid
        self.sid = sid


def scan(proc: str = "/proc") -> Dict[int, Entry]:
    """Every process visible in the sandbox, by pid."""
    table: Dict[int, Entry] = {}
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        try:
            with open("%s/%s/stat" % (proc, name), "rb") as stat:
                raw = stat.read()
        except OSError:  # it exited while we looked
            continue
        # The command name may hold spaces and parentheses: fields start after the last ')'.
        fields = raw[raw.rfind(b")") + 2 :].split()
        if fields[0] not in (b"Z", b"X"):  # dead already, waiting to be reaped
            table[int(name)] = Entry(ppid=int(fields[1]), sid=int(fields[3]))
    return table


def family(leader: int) -> Callable[[Dict[int, Entry]], Set[int]]:
    """The members of the command whose leader is `leader`, in a table from `scan`."""

    def members(table: Dict[int, Entry]) -> Set[int]:
        found = {pid for pid, entry in table.items() if entry.sid == leader}
        if leader in table:
            found.add(leader)
        children: Dict[int, Set[int]] = {}
        for pid, entry in table.items():
            children.setdefault(entry.ppid, set()).add(pid)
        todo = list(found)
        while todo:
            for child in children.get(todo.pop(), ()):
                if child not in found:
                    found.add(child)
                    todo.append(child)
        found.discard(os.getpid())
        return found

    return members


def everyone(table: Dict[int, Entry]) -> Set[int]:
    """Every process of the sandbox but the agent."""
    return set(table) - {os.getpid()}


def end_all(members: Callable[[Dict[int, Entry]], Iterable[int]]) -> int:
    """Stop what `members` finds until it finds nothing new, then kill all of it, and again
    until nothing is left (a process forking as it was stopped may have a child the last scan
    missed); return how many processes that was."""
    ended: Set[int] = set()
    for _ in range(MAX_ROUNDS):
        stopped = _freeze(members)
        if not stopped:
            break
        _send(stopped, signal.SIGKILL)
        ended |= stopped
        time.sleep(SETTLE)  # the kills take effect
    return len(ended)


def _freeze(members: Callable[[Dict[int, Entry]], Iterable[int]]) -> Set[int]:
    stopped: Set[int] = set()
    for _ in range(MAX_ROUNDS):
        fresh = set(members(scan())) - stopped
        if not fresh:
            break
        _send(fresh, signal.SIGSTOP)
        stopped |= fresh
    return stopped


def _send(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:  # already gone
            pass
