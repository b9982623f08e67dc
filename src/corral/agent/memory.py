"""An out-of-memory killer inside the sandbox, for runtimes whose host cgroup would otherwise
end the whole sandbox (gVisor: the Sentry is one host process, and the host's OOM killer takes
it, with every process, file and context in it).

The host sets the sandbox's budget (`limit`, its `memory_mb`) and gives the runtime's cgroup
some headroom above it. The agent watches the memory the sandbox's kernel says is in use; past
the budget it kills the process with the largest resident set (never itself), as a kernel
would, and the command that process belonged to reports `oom_killed`. It looks four times a
second while nothing the agent started runs, twenty times while something does (a process can
fill a few hundred MiB in a quarter of a second), and every 10 ms once over half the budget, so
an allocation outruns it by at most what the headroom absorbs. If killing cannot bring use
back under the budget (the overage is more than all processes hold: files in a memory
filesystem hold it), it kills nothing, and the host's limit ends the sandbox, with
out_of_memory as its reason.

Standard library only, for any Python >= 3.8, like the rest of the agent.
"""

from __future__ import annotations

import os
import time

TYPE_CHECKING = False  # `typing` is for annotations only: 2 ms of every agent's start (aio)
if TYPE_CHECKING:
    from typing import Callable, Dict, Optional, Tuple

try:
    from corral.agent import aio
    from corral.agent.lean import signal
except ImportError:  # inside the sandbox the agent directory itself is on sys.path
    import aio  # type: ignore[import-not-found,no-redef]
    from lean import signal  # type: ignore[import-not-found,no-redef]

IDLE_INTERVAL = 0.25
RUNNING_INTERVAL = 0.05
BUSY_INTERVAL = 0.01
SETTLE = 1.0  # seconds a kill's memory may take to show as freed
PAGE = os.sysconf("SC_PAGE_SIZE")


def in_use(meminfo: str = "/proc/meminfo") -> int:
    """Bytes of memory in use in the sandbox, as its kernel counts them."""
    fields: Dict[str, int] = {}
    with open(meminfo, "rb") as source:
        for line in source:
            name, _, rest = line.partition(b":")
            parts = rest.split()
            if parts:
                fields[name.decode()] = int(parts[0]) * 1024
    available = fields.get("MemAvailable", fields.get("MemFree", 0))
    return max(0, fields.get("MemTotal", 0) - available)


def processes(proc: str = "/proc") -> Tuple[Optional[Tuple[int, int]], int]:
    """(pid, resident bytes) of the process with the largest resident set, and the resident
    bytes of all of them together; the agent aside."""
    best: Optional[Tuple[int, int]] = None
    total = 0
    me = os.getpid()
    for name in os.listdir(proc):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open("%s/%s/statm" % (proc, name), "rb") as statm:
                resident = int(statm.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):  # gone, or a kernel thread
            continue
        total += resident
        if best is None or resident > best[1]:
            best = (int(name), resident)
    return best, total


class Guard:
    """The budget, and the last process killed for it until its memory is back."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.dying: Optional[int] = None
        self.used_at_kill = 0
        self.settle_until = 0.0

    async def watch(self, blame: Callable[[int], None], running: Callable[[], bool]) -> None:
        """Check, for as long as the agent runs; `running`: whether a process it started runs."""
        while True:
            try:
                delay = self.check(blame)
            except (OSError, ValueError):  # /proc unreadable for a moment: look again later
                delay = IDLE_INTERVAL
            if delay == IDLE_INTERVAL and running():
                delay = RUNNING_INTERVAL
            await aio.sleep(delay)

    def check(self, blame: Callable[[int], None]) -> float:
        """Kill the largest process if the sandbox is over its budget, calling `blame` with
        its pid first; seconds until the next check."""
        used = in_use()
        if used <= self.limit:
            self.dying = None
            return BUSY_INTERVAL if used * 2 > self.limit else IDLE_INTERVAL
        if self.dying is not None and (
            _alive(self.dying)
            or (time.monotonic() < self.settle_until and used <= self.used_at_kill)
        ):
            # One kill at a time: the kernel counts a dead process's memory as freed a moment
            # after it has gone. Only use still growing meanwhile (another process allocating)
            # makes a second victim before then.
            return BUSY_INTERVAL
        victim, held = processes()
        # Past the budget by more than every process holds, files in memory (/dev/shm) hold
        # the rest, and no kill can bring the sandbox back: the host's limit ends it instead.
        if victim is not None and held >= used - self.limit:
            blame(victim[0])
            try:
                os.kill(victim[0], signal.SIGKILL)
                self.dying = victim[0]
                self.used_at_kill, self.settle_until = used, time.monotonic() + SETTLE
            except OSError:  # it exited meanwhile
                pass
        return BUSY_INTERVAL


def _alive(pid: int) -> bool:
    """Whether `pid` still holds its memory (a zombie has let it go)."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as stat:
            raw = stat.read()
    except OSError:
        return False
    return raw[raw.rfind(b")") + 2 : raw.rfind(b")") + 3] not in (b"Z", b"X")
