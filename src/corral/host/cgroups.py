"""Per-sandbox control groups: memory, pids and CPU limits, freezing, killing, OOM counts.

Both layouts are supported: the unified cgroup2 hierarchy, and cgroup v1 controllers mounted
one per directory (which may sit beside an empty cgroup2 mount, the "hybrid" layout).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from corral.core.errors import SandboxFailed
from corral.host import mounts

ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct", "freezer")
CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class CgroupLimits:
    """The limits one sandbox's cgroup enforces."""

    memory_bytes: int
    max_processes: int
    cpu: float  # cores; the CFS quota per period
    cpu_weight: int = 100  # share under contention, as cgroup v2's cpu.weight (1 to 10000)


def shares(weight: int) -> int:
    """cgroup v1's cpu.shares (default 1024) for a v2 cpu.weight (default 100)."""
    return max(2, weight * 1024 // 100)


FAVOR = "favordynmods"
# cgroup2's own mount options: a remount sets all of them, so those on are given again.
CGROUP2_OPTIONS = frozenset(
    ("nsdelegate", "memory_localevents", "memory_recursiveprot", "memory_hugetlb_accounting",
     "pids_localevents", FAVOR)
)  # fmt: skip
# Per-mount flags as mountinfo names them (MS_*): a remount clears those it is not given.
MOUNT_FLAGS = {"ro": 0x1, "nosuid": 0x2, "nodev": 0x4, "noexec": 0x8, "noatime": 0x400,
               "nodiratime": 0x800, "relatime": 0x200000, "strictatime": 0x1000000}  # fmt: skip
MS_REMOUNT = 0x20


def favor_dynamic_changes(
    mountinfo: Path = Path("/proc/self/mountinfo"),
    features: Path = Path("/sys/kernel/cgroup/features"),
) -> str:
    """Turn on the kernel's `favordynmods` cgroup mode where it has one and it is off.

    Without it, moving a process into a cgroup (every sandbox's start does, runsc several
    times) waits for an RCU grace period: 8 to 16 ms on this project's VMs, 0.2 ms with it
    (docs/performance.md, "Moving processes between cgroups"). Forks and exits take one more
    lock in exchange. It is the host's setting, set on its cgroup2 mount (the hybrid layout
    has one too) and kept there until reboot (Linux 6.17 and later cannot turn it off again).

    What was found or done: "on" (it was), "turned on", or "unsupported" (the kernel does not
    have it, or there is no cgroup2 mount to set it on)."""
    try:
        offered = features.read_text().split()
    except OSError:
        offered = []
    found = cgroup2_mount(mountinfo.read_text(encoding="utf-8", errors="surrogateescape"))
    if found is None or FAVOR not in offered:
        return "unsupported"
    target, flags, options = found
    if FAVOR in options:
        return "on"
    given = ",".join([*(o for o in options if o in CGROUP2_OPTIONS), FAVOR])
    mounts.mount("cgroup2", target, "cgroup2", MS_REMOUNT | flags, given)
    # Outside the host's own cgroup namespace (a container) the kernel accepts and ignores it.
    now = cgroup2_mount(mountinfo.read_text(encoding="utf-8", errors="surrogateescape"))
    return "turned on" if now is not None and FAVOR in now[2] else "unsupported"


def cgroup2_mount(mountinfo: str) -> tuple[Path, int, list[str]] | None:
    """The first cgroup2 mount in `mountinfo` (/proc/self/mountinfo's text): its mount point,
    its per-mount flags (MS_*) and its superblock's options."""
    for line in mountinfo.splitlines():
        head, separator, tail = line.partition(" - ")
        fields, described = head.split(), tail.split()
        if not separator or len(fields) < 6 or len(described) < 3 or described[0] != "cgroup2":
            continue
        point = fields[4].encode("latin-1", "surrogateescape").decode("unicode_escape")
        flags = sum(MOUNT_FLAGS.get(option, 0) for option in fields[5].split(","))
        return Path(point), flags, described[2].split(",")
    return None


@functools.cache
def layout() -> str:
    """'v2' for a unified hierarchy, 'v1' for per-controller mounts, '' if neither is usable.

    Read once: the hierarchy does not change under a running host."""
    if (ROOT / "cgroup.controllers").exists():
        return "v2"
    if all((ROOT / c / "cgroup.procs").exists() for c in ("memory", "pids", "cpu", "freezer")):
        return "v1"
    return ""


def cpu_limit(root: Path = ROOT, own: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPUs this process's cgroup and its ancestors let it use (the tightest CFS quota),
    None where none is set: a container's CPU limit, which the CPU affinity does not show."""
    limits: list[float] = []
    for line in _read(own).splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "" and (root / "cgroup.controllers").exists():  # v2
            base, name = root, "cpu.max"
        elif "cpu" in controllers.split(","):  # v1
            base, name = root / "cpu", "cpu.cfs_quota_us"
        else:
            continue
        where = base / path.strip("/")
        while True:
            limits += filter(None, [_quota(where, name)])
            if where == base:
                break
            where = where.parent
    return min(limits, default=None)


def _quota(where: Path, name: str) -> float | None:
    """The cores `where`'s quota allows, None if unbounded or unreadable."""
    if name == "cpu.max":
        quota, _, period = _read(where / name).partition(" ")
    else:
        quota, period = _read(where / name), _read(where / "cpu.cfs_period_us")
    try:
        cores = int(quota) / int(period)
    except (ValueError, ZeroDivisionError):  # "max", -1 (no quota), or no such file
        return None
    return cores if cores > 0 else None


def _write(path: Path, value: str) -> None:
    with path.open("w") as handle:
        handle.write(value)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


class Cgroup:
    """One sandbox's cgroup, named by a relative path such as ``corral/sb-…``."""

    def __init__(self, name: str, version: str | None = None) -> None:
        self.name = name.strip("/")
        self.version = version if version is not None else layout()
        if self.version not in ("v1", "v2"):
            raise SandboxFailed(
                "no usable cgroup hierarchy under /sys/fs/cgroup", code="no_cgroups"
            )

    def _dir(self, controller: str) -> Path:
        if self.version == "v2":
            return ROOT / self.name
        return ROOT / controller / self.name

    def _dirs(self) -> list[Path]:
        if self.version == "v2":
            return [ROOT / self.name]
        return [ROOT / c / self.name for c in V1_CONTROLLERS if (ROOT / c).is_dir()]

    @property
    def procs_files(self) -> list[str]:
        """The files a process writes "0" into to join this cgroup (every controller in v1)."""
        return [str(d / "cgroup.procs") for d in self._dirs()]

    def create(self, limits: CgroupLimits) -> None:
        """Create the cgroup (and its parents) and apply `limits`."""
        if self.version == "v2":
            self._enable_v2_controllers()
        for directory in self._dirs():
            directory.mkdir(parents=True, exist_ok=True)
        quota = max(1000, int(limits.cpu * CPU_PERIOD_US))
        if self.version == "v2":
            d = self._dir("")
            _write(d / "memory.max", str(limits.memory_bytes))
            with contextlib.suppress(OSError):
                _write(d / "memory.swap.max", "0")
            _write(d / "pids.max", str(limits.max_processes))
            _write(d / "cpu.max", f"{quota} {CPU_PERIOD_US}")
            self.set_weight(limits.cpu_weight)
            return
        memory = self._dir("memory")
        _write(memory / "memory.limit_in_bytes", str(limits.memory_bytes))
        memsw = memory / "memory.memsw.limit_in_bytes"
        if memsw.exists():  # swap accounting on: forbid swapping past the limit too
            with contextlib.suppress(OSError):
                _write(memsw, str(limits.memory_bytes))
        _write(self._dir("pids") / "pids.max", str(limits.max_processes))
        cpu = self._dir("cpu")
        _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
        _write(cpu / "cpu.cfs_quota_us", str(quota))
        self.set_weight(limits.cpu_weight)

    def set_weight(self, weight: int) -> None:
        """The cgroup's CPU share under contention (cgroup v2 units: 1 to 10000, default 100)."""
        if self.version == "v2":
            _write(self._dir("") / "cpu.weight", str(weight))
        else:
            _write(self._dir("cpu") / "cpu.shares", str(shares(weight)))

    def _enable_v2_controllers(self) -> None:
        parts = Path(self.name).parts[:-1]
        current = ROOT
        for part in parts:
            with contextlib.suppress(OSError):
                _write(current / "cgroup.subtree_control", "+memory +pids +cpu")
            current = current / part
            current.mkdir(exist_ok=True)
        with contextlib.suppress(OSError):
            _write(current / "cgroup.subtree_control", "+memory +pids +cpu")

    def exists(self) -> bool:
        return self._dir("memory").is_dir()

    def pids(self) -> list[int]:
        """Every process in the cgroup."""
        found: set[int] = set()
        for directory in self._dirs():
            for line in _read(directory / "cgroup.procs").split():
                found.add(int(line))
        return sorted(found)

    def freeze(self) -> None:
        """Stop every process in the cgroup; they keep their memory and use no CPU."""
        self._set_frozen(True)

    def thaw(self) -> None:
        self._set_frozen(False)

    def frozen(self) -> bool:
        if self.version == "v2":
            return "frozen 1" in _read(self._dir("") / "cgroup.events")
        return "FROZEN" in _read(self._dir("freezer") / "freezer.state")

    def _set_frozen(self, frozen: bool) -> None:
        if self.version == "v2":
            d = self._dir("")
            _write(d / "cgroup.freeze", "1" if frozen else "0")
            want = "frozen 1" if frozen else "frozen 0"
            check = d / "cgroup.events"
        else:
            d = self._dir("freezer")
            _write(d / "freezer.state", "FROZEN" if frozen else "THAWED")
            want = "FROZEN" if frozen else "THAWED"
            check = d / "freezer.state"
        deadline = time.monotonic() + 5
        while want not in _read(check):
            if time.monotonic() > deadline:
                raise SandboxFailed(
                    f"cgroup {self.name} did not become {want}", code="freeze_failed"
                )
            time.sleep(0.001)

    def kill_all(self) -> None:
        """SIGKILL every process in the cgroup, including ones that forked meanwhile."""
        if self.version == "v2" and (self._dir("") / "cgroup.kill").exists():
            _write(self._dir("") / "cgroup.kill", "1")
            return
        # Freeze first so nothing can fork between reading the list and killing it.
        with contextlib.suppress(OSError, SandboxFailed):
            self.freeze()
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError, SandboxFailed):
            self.thaw()

    def usage(self) -> tuple[float, int, int]:
        """(CPU seconds used so far, memory bytes in use, processes) of everything in it."""
        if self.version == "v2":
            d = self._dir("")
            lines = (line.split(" ", 1) for line in _read(d / "cpu.stat").splitlines())
            stat = {pair[0]: pair[1] for pair in lines if len(pair) == 2}
            cpu = int(stat.get("usage_usec", "0")) / 1e6
            memory = _read(d / "memory.current")
            processes = _read(d / "pids.current")
        else:
            cpu = int(_read(self._dir("cpuacct") / "cpuacct.usage").strip() or 0) / 1e9
            memory = _read(self._dir("memory") / "memory.usage_in_bytes")
            processes = _read(self._dir("pids") / "pids.current")
        return cpu, int(memory.strip() or 0), int(processes.strip() or 0)

    def oom_kills(self) -> int:
        """How many processes the kernel's OOM killer has killed in this cgroup."""
        if self.version == "v2":
            text = _read(self._dir("") / "memory.events")
        else:
            text = _read(self._dir("memory") / "memory.oom_control")
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def destroy(self, timeout: float = 5.0) -> None:
        """Kill what is left and remove the cgroup; missing is fine."""
        deadline = time.monotonic() + timeout
        for directory in self._dirs():
            while directory.exists():
                try:
                    directory.rmdir()
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SandboxFailed(
                            f"cgroup {directory} still has processes", code="cleanup_failed"
                        ) from None
                    self.kill_all()
                    time.sleep(0.01)
