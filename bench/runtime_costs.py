"""Measure what a sandbox costs under each runtime: start time, command round trip, idle memory.

Usage (as root, after scripts/setup):
    .venv/bin/python bench/runtime_costs.py [--samples 20] [--idle 10] [--data-dir DIR]

Prints one table per runtime. "create" is Engine.create until the guest agent answers;
"first command" adds running `echo ok` to completion; "idle PSS" sums the proportional set size
of every host process in the sandbox's cgroup (bwrap + agent, or gVisor's Sentry, Gofer and
stubs) with `--idle` sandboxes running at once.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

from corral.core.spec import SandboxSpec
from corral.engine import Engine
from corral.host.cgroups import Cgroup


def pss_kib(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def quantiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return (
        f"p50 {statistics.median(ordered) * 1000:7.1f} ms   p95 {p95 * 1000:7.1f} ms   "
        f"max {ordered[-1] * 1000:7.1f} ms"
    )


async def measure(engine: Engine, runtime: str, samples: int, idle: int) -> None:
    spec = SandboxSpec(runtime=runtime)
    create, first, exec_rtt, terminate = [], [], [], []
    for _ in range(samples):
        start = time.perf_counter()
        info = await engine.create(spec)
        created = time.perf_counter()
        result = await engine.run(info.id, "echo ok")
        done = time.perf_counter()
        assert result.stdout == b"ok\n", result
        for _ in range(5):
            before = time.perf_counter()
            await engine.run(info.id, ["true"])
            exec_rtt.append(time.perf_counter() - before)
        before = time.perf_counter()
        await engine.terminate(info.id)
        terminate.append(time.perf_counter() - before)
        create.append(created - start)
        first.append(done - start)

    sandboxes = [await engine.create(spec) for _ in range(idle)]
    await asyncio.sleep(2)
    per_sandbox = []
    for info in sandboxes:
        pids = Cgroup(f"corral/{info.id}").pids()
        per_sandbox.append(sum(pss_kib(pid) for pid in pids) / 1024)
    await asyncio.gather(*(engine.terminate(info.id) for info in sandboxes))

    print(f"\n## {runtime} ({samples} samples, debian image, network none)")
    print(f"create (agent ready)      {quantiles(create)}")
    print(f"create + first command   {quantiles(first)}")
    print(f"exec round trip (true)   {quantiles(exec_rtt)}")
    print(f"terminate                {quantiles(terminate)}")
    pss = statistics.median(per_sandbox)
    print(f"idle PSS per sandbox     {pss:7.1f} MiB ({idle} idle at once)")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--idle", type=int, default=10)
    parser.add_argument("--data-dir", default="/var/tmp/corral-bench")
    parser.add_argument("--runtime", action="append", choices=["namespaces", "gvisor"])
    args = parser.parse_args()
    async with Engine(args.data_dir) as engine:
        for runtime in args.runtime or ["namespaces", "gvisor"]:
            reason = engine.runtimes.unavailable_reason(runtime)
            if reason is not None:
                print(f"\n## {runtime}: skipped ({reason})")
                continue
            warm_up = await engine.create(SandboxSpec(runtime=runtime))  # builds the image once
            await engine.terminate(warm_up.id)
            await measure(engine, runtime, args.samples, args.idle)


if __name__ == "__main__":
    asyncio.run(main())
