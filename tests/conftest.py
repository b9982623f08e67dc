"""Shared fixtures: a real engine on a real data directory, parametrized over every runtime.

Images are built once into CORRAL_TEST_DATA_DIR (default /var/tmp/corral-test) and reused by
later runs; sandboxes are real bubblewrap or runsc sandboxes. A runtime the machine cannot run
is skipped with the reason it gives.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path

import pytest

from corral import runtimes
from corral.core.models import SandboxInfo
from corral.core.spec import SandboxSpec
from corral.engine import Engine

DATA_DIR = Path(os.environ.get("CORRAL_TEST_DATA_DIR", "/var/tmp/corral-test"))
RUNTIME_NAMES = ("namespaces", "gvisor")
# Runtimes this machine must run (CI sets both): one that cannot run fails its tests, rather
# than skipping them and leaving a green run that proved nothing about it.
REQUIRED = {name for name in os.environ.get("CORRAL_REQUIRE_RUNTIMES", "").split(",") if name}


def host_remnants() -> set[str]:
    """What sandboxes hold on the host, whoever made them: their cgroups (in every scope), netns
    and processes, and the host's interfaces."""
    from corral.host.cgroups import ROOT, layout

    parent = ROOT / ("memory" if layout() == "v1" else "")
    netns = Path("/run/netns")
    return {
        *(p.name for p in parent.glob("corral*/sb-*")),
        *((p.name for p in netns.glob("sb-*")) if netns.is_dir() else ()),
        *(p.name for p in Path("/sys/class/net").iterdir()),
        *(p.name for p in Path("/proc").iterdir() if p.name.isdigit() and _is_sandbox_process(p)),
    }


# What was on the host before this run: a run killed half-way leaves its sandboxes' cgroups and
# netns behind, and the machine, with them, goes on to the next run. The leftover checks look
# for what this run leaves (`new`); the report's header names what it found.
EARLIER: set[str] = set()


def pytest_configure() -> None:
    EARLIER.update(host_remnants())


def new(names: Iterable[str]) -> list[str]:
    """`names` less what was on the host before this run (`EARLIER`)."""
    return sorted(name for name in names if name not in EARLIER)


def pytest_report_header() -> list[str]:
    lines = []
    strays = sorted(name for name in EARLIER if name.startswith("sb-") or name.isdigit())
    if strays:
        lines.append(f"left on this host by earlier runs (ignored by leftover checks): {strays}")
    for name in RUNTIME_NAMES:
        reason = runtimes.unavailable_reason(name)
        missing = "FAILS (required): " if name in REQUIRED else "SKIPPED: "
        lines.append(f"runtime {name}: {'available' if reason is None else missing + reason}")
    return lines


def require_runtime(name: str) -> None:
    reason = runtimes.unavailable_reason(name)
    if reason is None:
        return
    if name in REQUIRED:
        pytest.fail(f"runtime {name} is required here (CORRAL_REQUIRE_RUNTIMES) but: {reason}")
    pytest.skip(f"runtime {name} unavailable: {reason}")


@pytest.fixture(params=RUNTIME_NAMES)
def runtime(request: pytest.FixtureRequest) -> str:
    """Each runtime in turn; skipped with the reason when the machine cannot run it."""
    name: str = request.param
    require_runtime(name)
    return name


@pytest.fixture(scope="session")
def data_dir() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("sandboxes need root (the engine mounts, makes cgroups and namespaces)")
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    yield DATA_DIR


@pytest.fixture
async def engine(data_dir: Path) -> AsyncIterator[Engine]:
    async with Engine(data_dir) as started:
        yield started


@pytest.fixture
async def sandbox(engine: Engine, runtime: str) -> AsyncIterator[SandboxInfo]:
    """A running debian sandbox under each runtime."""
    info = await engine.create(SandboxSpec(runtime=runtime))
    yield info
    await engine.terminate(info.id)


def leftovers(data_dir: Path) -> dict[str, list[str]]:
    """What sandboxes leave on the host: their directories, cgroups, mounts (volumes' too),
    netns, processes (those of this run: `new`)."""
    from corral.host.cgroups import ROOT, layout

    group = ROOT / ("memory" if layout() == "v1" else "") / "corral"
    netns = Path("/run/netns")
    return {
        "dirs": sorted(p.name for p in (data_dir / "sandboxes").glob("sb-*")),
        "cgroups": new(p.name for p in group.glob("sb-*")) if group.is_dir() else [],
        "mounts": sorted(  # a volume's disk stays mounted only while a sandbox uses it
            point
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if (point := line.split()[4]).startswith(
                (f"{data_dir}/sandboxes/", f"{data_dir}/volumes/")
            )
        ),
        "netns": new(p.name for p in netns.glob("sb-*")) if netns.is_dir() else [],
        "processes": new(
            p.name for p in Path("/proc").iterdir() if p.name.isdigit() and _is_sandbox_process(p)
        ),
    }


def _is_sandbox_process(proc: Path) -> bool:
    try:
        cmdline = (proc / "cmdline").read_bytes()
    except OSError:
        return False
    return b"/run/corral/agent/start.py" in cmdline or cmdline.startswith(
        (b"runsc-sandbox", b"runsc-gofer")
    )


def proc_status(pid: int) -> dict[str, str]:
    """`/proc/<pid>/status` as a table ("PPid", "State"...); empty once the process is reaped."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


async def wait_until(condition: Callable[[], bool], what: str, hang: float = 60.0) -> None:
    """Poll `condition` until it holds; `hang` seconds only to catch hangs."""
    deadline = time.monotonic() + hang
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.05)
