"""Cluster mode on one machine: create throughput and the warm first command with 1, 2 and 3
nodes of a local cluster (`corral serve --cluster local:N`), what the front's routing costs
(the same exec through the front and straight at the node, samples interleaved), and what a
start from a snapshot held by another node costs (the copy) against one on its own node, and
what moving a running sandbox to another node costs against a hibernation and wake where it is.

    python bench/cluster.py --data-dir /var/tmp/corral-bench-cluster [--nodes 1,2,3]

Every node of a local cluster shares this machine's cores, so more nodes cannot make creates
faster here: the figures show what the front and placement add, not what a fleet gains. Run
it with nothing else on the machine, never beside the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from corral import AsyncClient, AsyncSandbox

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.e2e.conftest import Server, start_server

POOL = 2  # per node


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return {"n": len(ordered), "p50_ms": round(statistics.median(ordered) * 1000, 2),
            "p99_ms": round(p99 * 1000, 2)}  # fmt: skip


async def pools_full(client: AsyncClient, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        nodes = await client.nodes()
        if all(p["idle"] >= p["size"] for n in nodes for p in n.pools):
            return
        await asyncio.sleep(0.2)
    raise TimeoutError("the pools did not fill")


async def warm_first_command(
    client: AsyncClient, admin: AsyncClient, rounds: int
) -> dict[str, float]:
    samples = []
    for _ in range(rounds):
        await pools_full(admin)
        started = time.perf_counter()
        sandbox = await AsyncSandbox.create(runtime="namespaces", client=client)
        await sandbox.run("echo ok")
        samples.append(time.perf_counter() - started)
        await sandbox.terminate()
    return summary(samples)


async def create_throughput(client: AsyncClient, count: int, width: int) -> dict[str, Any]:
    """`count` cold creates (no pool), `width` at a time: creates per second, and where."""
    gate = asyncio.Semaphore(width)
    made: list[AsyncSandbox] = []

    async def one() -> None:
        async with gate:
            made.append(await AsyncSandbox.create(runtime="namespaces", pool=False, client=client))

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    seconds = time.perf_counter() - started
    spread: dict[str, int] = {}
    for sandbox in made:
        node = (await sandbox.info()).node or "?"
        spread[node] = spread.get(node, 0) + 1
    await asyncio.gather(*(sandbox.terminate() for sandbox in made))
    return {"creates": count, "at_once": width, "per_second": round(count / seconds, 2),
            "per_node": spread}  # fmt: skip


async def routing(front: Server, key: str, rounds: int) -> dict[str, Any]:
    """Exec of `true` through the front and straight at its node, interleaved."""
    async with AsyncClient(url=front.url, api_key=key) as client:
        sandbox = await AsyncSandbox.create(runtime="namespaces", client=client)
        node = (await sandbox.info()).node
        log = (front.data_dir / "nodes" / str(node) / "server.log").read_text()
        direct_url = re.findall(r"serves on (http://\S+)", log)[-1]
        body = {"argv": ["true"], "timeout": 60}
        auth = {"Authorization": f"Bearer {key}"}
        path = f"/v1/sandboxes/{sandbox.id}/exec"
        samples: dict[str, list[float]] = {"front": [], "direct": []}
        async with httpx.AsyncClient(headers=auth, timeout=60) as http:
            for _ in range(rounds):
                for name, base in (("front", front.url), ("direct", direct_url)):
                    started = time.perf_counter()
                    answer = await http.post(base + path, json=body)
                    samples[name].append(time.perf_counter() - started)
                    assert answer.status_code == 200, answer.text
        await sandbox.terminate()
    return {name: summary(values) for name, values in samples.items()}


async def snapshot_starts(front: Server, key: str, rounds: int) -> dict[str, Any]:
    """A gVisor sandbox started from a fresh snapshot on the node that holds it, and on the
    other node (the snapshot copied there first, as an archive checked against its digest)."""
    samples: dict[str, list[float]] = {"same_node": [], "other_node": []}
    size = 0
    async with httpx.AsyncClient(
        base_url=front.url, headers={"Authorization": f"Bearer {key}"}, timeout=300
    ) as http:
        origin = await http.post("/v1/sandboxes", json={"runtime": "gvisor", "node": "n0"})
        origin_id = origin.json()["id"]
        for _ in range(rounds):
            taken = (await http.post(f"/v1/sandboxes/{origin_id}/snapshot", json={})).json()
            size = taken["size_bytes"]
            for name, node in (("other_node", "n1"), ("same_node", "n0")):
                started = time.perf_counter()
                made = await http.post(
                    "/v1/sandboxes", json={"snapshot": taken["id"], "node": node}
                )
                samples[name].append(time.perf_counter() - started)
                assert made.status_code == 201, made.text
                await http.delete(f"/v1/sandboxes/{made.json()['id']}")
            await http.delete(f"/v1/snapshots/{taken['id']}")
        await http.delete(f"/v1/sandboxes/{origin_id}")
    return {"snapshot_mb": round(size / 1e6, 1), **{k: summary(v) for k, v in samples.items()}}


async def moves(front: Server, key: str, rounds: int) -> dict[str, Any]:
    """A running gVisor sandbox moved to the other node and woken there (hibernate, copy,
    take in, wake), against a hibernation and a wake on its own node; interleaved."""
    samples: dict[str, list[float]] = {"move_running": [], "hibernate_and_wake": []}
    async with httpx.AsyncClient(
        base_url=front.url, headers={"Authorization": f"Bearer {key}"}, timeout=300
    ) as http:
        made = await http.post("/v1/sandboxes", json={"runtime": "gvisor", "node": "n0"})
        path = f"/v1/sandboxes/{made.json()['id']}"
        for _ in range(rounds):
            started = time.perf_counter()
            for step in ("/hibernate", "/wake"):
                assert (await http.post(path + step)).status_code == 200
            samples["hibernate_and_wake"].append(time.perf_counter() - started)
            started = time.perf_counter()
            moved = await http.post(path + "/move", json={})
            samples["move_running"].append(time.perf_counter() - started)
            assert moved.status_code == 200 and moved.json()["state"] == "running", moved.text
        await http.delete(path)
    return {name: summary(values) for name, values in samples.items()}


async def measure(front: Server, nodes: int, rounds: int) -> dict[str, Any]:
    key = front.new_key("bench")
    async with AsyncClient(url=front.url, api_key=front.admin_key) as admin:
        await pools_full(admin)
        async with AsyncClient(url=front.url, api_key=key) as client:
            figures: dict[str, Any] = {"nodes": nodes}
            figures["warm_first_command"] = await warm_first_command(client, admin, rounds)
            figures["cold_create_throughput"] = await create_throughput(client, 24, 8)
    figures["exec_routing"] = await routing(front, key, rounds * 5)
    if nodes >= 2:
        figures["snapshot_start"] = await snapshot_starts(front, key, max(3, rounds // 4))
        figures["move"] = await moves(front, key, max(3, rounds // 4))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("/var/tmp/corral-bench-cluster"))
    parser.add_argument("--nodes", default="1,2,3")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    results = []
    for nodes in (int(n) for n in args.nodes.split(",")):
        front = start_server(
            args.data_dir / f"cluster{nodes}", args.data_dir / "images",
            "--cluster", f"local:{nodes}", "--pool", f"namespaces:default:{POOL}",
            start_timeout=300,
        )  # fmt: skip
        try:
            results.append(asyncio.run(measure(front, nodes, args.rounds)))
        finally:
            front.stop()
        print(json.dumps(results[-1]), flush=True)
    (args.data_dir / "cluster.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
