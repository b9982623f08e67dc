"""A/B of two versions of Corral in one run: the same figures against a server started from
another checkout's interpreter (the baseline, such as `main`) and one from this checkout,
samples interleaved, so that both see the same machine at the same moments.

    python bench/ab.py --baseline /work/main/.venv/bin/python --data-dir /var/tmp/corral-ab

Figures, per runtime: a claim from a warm pool (POST /v1/sandboxes), the warm first command
(the claim and `run("echo ok")`), the cold one (no pool) and its terminate, and the exec
round trip of an argv command (`["true"]`) and of a shell one (`"echo ok"`); `--cold` measures
only the cold ones and their terminates. Each server gets its own data directory
(images shared), so two engines run at once: run it on a machine with nothing else running,
never beside the test suite. `--baseline-arg` passes an option to the baseline's server only,
to A/B a setting within one checkout:

    python bench/ab.py --baseline .venv/bin/python --baseline-arg=--no-boot-images

`--burst N` measures only bursts of N creates at once without a pool (`--rounds` of them per
side, the sides taking turns): success, each create's time to its first command, and failures
by code with the first message of each:

    python bench/ab.py --baseline .venv/bin/python --baseline-arg=--start-limit=0 \
        --runtime gvisor --burst 100 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from corral import AsyncClient, AsyncSandbox, CorralError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.run import Failures
from tests.e2e.conftest import Server, start_server

POOL = 4


@contextlib.contextmanager
def servers(baseline: str, data_dir: Path, extra: list[str]) -> Iterator[dict[str, Server]]:
    images = data_dir / "images"
    made: dict[str, Server] = {}
    try:
        made["baseline"] = start_server(data_dir / "baseline", images, *extra, python=baseline)
        made["this"] = start_server(data_dir / "this", images)
        yield made
    finally:
        for server in made.values():
            server.stop_and_clean()


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    at = lambda share: ordered[min(len(ordered) - 1, int(share * len(ordered)))]  # noqa: E731
    return {"n": len(ordered), "p50_ms": round(statistics.median(ordered) * 1000, 2),
            "p99_ms": round(at(0.99) * 1000, 2)}  # fmt: skip


async def idle(client: AsyncClient, pool: str) -> None:
    while True:
        if next(p for p in await client.list_pools() if p["name"] == pool)["idle"] >= POOL:
            return
        await asyncio.sleep(0.05)


async def claims(clients: dict[str, AsyncClient], runtime: str, rounds: int) -> dict[str, Any]:
    """A claim, and a claim with its first command, `POOL` of each per round and side."""
    pool = f"ab-{runtime}"
    for client in clients.values():
        await client.set_pool(pool, POOL, runtime=runtime)
    figures: dict[str, dict[str, list[float]]] = {
        name: {"claim": [], "first command": []} for name in clients
    }
    for _ in range(rounds):
        for name, client in clients.items():  # interleaved by round
            await idle(client, pool)
            made = []
            for n in range(POOL):
                start = time.perf_counter()
                sandbox = await AsyncSandbox.create(runtime=runtime, client=client)
                claimed = time.perf_counter()
                if n % 2:  # half with their first command, half the claim alone
                    assert (await sandbox.run("echo ok")).stdout == "ok\n"
                    figures[name]["first command"].append(time.perf_counter() - start)
                else:
                    figures[name]["claim"].append(claimed - start)
                made.append(sandbox)
            await asyncio.gather(*(s.terminate() for s in made))
    for client in clients.values():
        await client.remove_pool(pool)
    return {name: {what: summary(s) for what, s in f.items()} for name, f in figures.items()}


async def colds(clients: dict[str, AsyncClient], runtime: str, rounds: int) -> dict[str, Any]:
    """A create without a pool and its first command, then its terminate, two per round and
    side."""
    times: dict[str, dict[str, list[float]]] = {
        name: {"cold first command": [], "terminate": []} for name in clients
    }
    for _ in range(rounds):
        for name, client in clients.items():
            for _ in range(2):
                start = time.perf_counter()
                sandbox = await AsyncSandbox.create(runtime=runtime, pool=False, client=client)
                assert (await sandbox.run("echo ok")).stdout == "ok\n"
                times[name]["cold first command"].append(time.perf_counter() - start)
                start = time.perf_counter()
                await sandbox.terminate()
                times[name]["terminate"].append(time.perf_counter() - start)
    return {name: {what: summary(t) for what, t in f.items()} for name, f in times.items()}


async def execs(clients: dict[str, AsyncClient], runtime: str, samples: int) -> dict[str, Any]:
    boxes = {
        name: await AsyncSandbox.create(runtime=runtime, pool=False, client=client)
        for name, client in clients.items()
    }
    commands: dict[str, str | list[str]] = {"exec argv": ["true"], "exec shell": "echo ok"}
    times = {name: {what: list[float]() for what in commands} for name in clients}
    try:
        for _ in range(samples):
            for name, box in boxes.items():
                for what, command in commands.items():
                    start = time.perf_counter()
                    await box.run(command)
                    times[name][what].append(time.perf_counter() - start)
    finally:
        for box in boxes.values():
            await box.terminate()
    return {name: {what: summary(t) for what, t in f.items()} for name, f in times.items()}


async def bursts(
    clients: dict[str, AsyncClient], runtime: str, count: int, rounds: int
) -> dict[str, Any]:
    """`count` creates at once without a pool, each with its first command, ended together
    after; a burst per round and side, the sides taking turns."""
    found: dict[str, dict[str, Any]] = {}
    for name in clients:
        found[name] = {"times": [], "walls": [], "failures": Failures()}
    for _ in range(rounds):
        for name, client in clients.items():
            side = found[name]

            async def one(client: AsyncClient = client, side: dict[str, Any] = side) -> Any:
                start = time.perf_counter()
                try:
                    sandbox = await AsyncSandbox.create(runtime=runtime, pool=False, client=client)
                except CorralError as exc:
                    side["failures"].add(f"create: {exc.code}", exc.message)
                    return None
                try:
                    if (await sandbox.run("echo ok")).stdout == "ok\n":
                        side["times"].append(time.perf_counter() - start)
                    else:
                        side["failures"].add("echo: wrong output")
                except CorralError as exc:
                    side["failures"].add(f"echo: {exc.code}", exc.message)
                return sandbox

            start = time.perf_counter()
            made = await asyncio.gather(*(one() for _ in range(count)))
            side["walls"].append(round(time.perf_counter() - start, 2))
            await asyncio.gather(*(s.terminate() for s in made if s), return_exceptions=True)
    return {
        name: {
            f"burst {count}": {
                **(summary(side["times"]) if side["times"] else {}),
                "success": round(len(side["times"]) / (count * rounds), 4),
                "wall_s": side["walls"],
                **side["failures"].figure(),
            }
        }
        for name, side in found.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="the baseline checkout's python")
    parser.add_argument("--data-dir", type=Path, default=Path("/var/tmp/corral-ab"))
    parser.add_argument("--runtime", action="append", choices=["namespaces", "gvisor"])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument(
        "--burst", type=int, default=0, help="only bursts of this many creates at once"
    )
    parser.add_argument("--cold", action="store_true", help="only cold creates and terminates")
    parser.add_argument(
        "--baseline-arg", action="append", default=[], help="an option for the baseline's server"
    )
    args = parser.parse_args()
    where = "import corral, os; print(os.path.dirname(corral.__file__))"
    found = subprocess.run([args.baseline, "-c", where], capture_output=True, text=True, check=True)
    results: dict[str, Any] = {"baseline": found.stdout.strip(), "this": os.getcwd()}
    # Stopped outside the event loop.
    with servers(args.baseline, args.data_dir, args.baseline_arg) as running:
        results.update(asyncio.run(measure(args, running)))
    print(json.dumps(results))


async def measure(args: argparse.Namespace, running: dict[str, Server]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async with contextlib.AsyncExitStack() as stack:
        clients = {
            name: await stack.enter_async_context(
                AsyncClient(url=server.url, api_key=server.admin_key)
            )
            for name, server in running.items()
        }
        for runtime in args.runtime or ["namespaces", "gvisor"]:
            if args.burst:
                results[runtime] = await bursts(clients, runtime, args.burst, args.rounds)
                print(runtime, json.dumps(results[runtime], indent=1), flush=True)
                continue
            found = await colds(clients, runtime, args.rounds)
            if not args.cold:
                for name, more in (await claims(clients, runtime, args.rounds)).items():
                    found[name].update(more)
                for name, more in (await execs(clients, runtime, args.samples)).items():
                    found[name].update(more)
            results[runtime] = found
            print(runtime, json.dumps(found, indent=1), flush=True)
    return results


if __name__ == "__main__":
    main()
