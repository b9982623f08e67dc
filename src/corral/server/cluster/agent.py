"""The cluster's Ray driver: one actor per node that starts and keeps that node's Corral
server, and a watch that reports each node up or lost, as JSON lines on stdout.

Run by the front as ``python -m corral.server.cluster.agent`` with the plan on stdin:
``{"address": ..., "env": {...}, "nodes": [{"name", "resource", "argv"}], "join": null}`` for a
local cluster, whose nodes the front names (``resource`` is the Ray resource only that node
has: its actor is pinned there); for a joined cluster, ``"nodes": []`` and ``"join": {"args",
"data_dir"}``: every live Ray node that offers ``corral_node``, now or later, gets an actor,
which names the node and starts its server (`corral.server.cluster.joining`). Lines it prints:
``{"node": NAME, "state": "up"}`` once its server process runs (with ``url``, ``ca`` and
``scope`` for a joined node), ``{"state": "joined"}`` once the nodes there at the start are
up, ``{"node": NAME, "state": "lost", "detail": ...}`` when Ray reports the node or its actor
dead. It ends when stdin closes (the front is gone), taking a local cluster's actors and their
servers with it. A joined cluster's node actors are its Ray nodes' own (detached, named by Ray
node in the namespace ``corral``): every front finds the same ones, and they live on.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from corral.server.cluster import joining

PING_EVERY = 1.0
PING_TIMEOUT = 3.0
MISSES = 2  # consecutive failed pings before a node is lost
PR_SET_PDEATHSIG = 1
START_TIMEOUT = 120.0  # for a joined node's actor to be placed and name itself
CONNECT_TIMEOUT = 90.0  # for the cluster's head to answer
NAMESPACE = "corral"  # where a joined cluster's node actors are found by name


def _die_with_parent() -> None:
    """In the node server's process: SIGKILL when the actor's process dies (the node is
    lost), so no node server outlives its Ray node."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@ray.remote(num_cpus=0, max_restarts=0)
class NodeKeeper:
    """Starts one node's Corral server and answers for it while it runs."""

    def __init__(
        self, argv: list[str], env: dict[str, str], join: dict[str, Any] | None = None
    ) -> None:
        """Run `argv`, or with `join` the command this Ray node's Corral server is."""
        self.joined: dict[str, Any] | None = None
        if join is not None:
            argv, joined = joining.node_server(join)
            self.joined = joined.said()
        self._server = subprocess.Popen(
            argv,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 (one call, before exec)
        )

    def alive(self) -> bool:
        return self._server.poll() is None

    def where(self) -> dict[str, Any] | None:
        """A joined node's name, URL, CA and scope (`joining.Joined`)."""
        return self.joined

    def stop(self) -> None:
        self._server.terminate()
        try:
            self._server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._server.kill()


# The front reads this process's stdout; Ray prints to it too (a raylet's death, its last
# logs), so what the agent says goes through its own copy of stdout, and Ray's to stderr.
_channel = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)


def _say(**line: Any) -> None:
    _channel.write(json.dumps(line) + "\n")


class Keepers:
    """The nodes' actors: those watched, by node name, and those this front started, which
    it stops when it stops (a local cluster's; a joined cluster's belong to its Ray nodes)."""

    def __init__(self, plan: dict[str, Any]) -> None:
        self.plan = plan
        self.watched: dict[str, Any] = {}
        self.started: list[Any] = []
        self._seen: set[str] = set()  # Ray node ids given an actor (joined clusters)

    def start_named(self) -> None:
        """A local cluster's nodes, each on the Ray node with its resource."""
        for node in self.plan["nodes"]:
            keeper = NodeKeeper.options(resources={node["resource"]: 0.001}).remote(  # type: ignore[attr-defined]
                node["argv"], self.plan["env"]
            )
            self.started.append(keeper)
            ray.get(keeper.alive.remote())
            self.watched[node["name"]] = keeper
            _say(node=node["name"], state="up")

    def join_new(self) -> None:
        """A joined cluster's Ray nodes that offer `corral_node` and have no actor yet."""
        if self.plan.get("join") is None:
            return
        for found in ray.nodes():  # type: ignore[no-untyped-call]
            node_id = found["NodeID"]
            offered = found.get("Resources", {}).get(joining.RESOURCE, 0)
            if not found.get("Alive") or not offered or node_id in self._seen:
                continue
            self._seen.add(node_id)
            # The Ray node's own actor, not this front's: every front of the cluster finds the
            # same one (and its server), and it lives as long as its Ray node.
            join = {**self.plan["join"], "host": found["NodeManagerAddress"]}
            keeper = NodeKeeper.options(  # type: ignore[attr-defined]
                name=f"node-{node_id}",
                lifetime="detached",
                get_if_exists=True,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote([], self.plan["env"], join)
            try:
                where = ray.get(keeper.where.remote(), timeout=START_TIMEOUT)
            except Exception as exc:  # the node died, or cannot name itself
                print(f"Ray node {node_id} is not used: {exc}", file=sys.stderr)
                continue
            if where["name"] in self.watched:
                print(f"two Ray nodes are named {where['name']}: {node_id} is not used "
                      f"(set {joining.NAME_ENV})", file=sys.stderr)  # fmt: skip
                with contextlib.suppress(Exception):
                    ray.get(keeper.stop.remote(), timeout=90)
                    ray.kill(keeper)
                continue
            self.watched[where["name"]] = keeper
            _say(node=where["name"], state="up", **{k: v for k, v in where.items() if k != "name"})

    def stop(self) -> None:
        for keeper in self.started:
            with contextlib.suppress(Exception):  # a lost node has nothing left to stop
                ray.get(keeper.stop.remote(), timeout=90)


JOIN_EVERY = 2.0  # seconds between looks for new Ray nodes


def _watch(keepers: Keepers, stopping: threading.Event) -> None:
    misses: dict[str, int] = {}
    looked = 0.0
    while not stopping.wait(PING_EVERY):
        if time.monotonic() - looked > JOIN_EVERY:
            keepers.join_new()
            looked = time.monotonic()
        for name, keeper in list(keepers.watched.items()):
            try:
                ok = ray.get(keeper.alive.remote(), timeout=PING_TIMEOUT)
                detail = "its Corral server exited"
            except Exception as exc:  # the actor, its worker or its node is gone
                ok, detail = False, f"Ray lost it: {type(exc).__name__}"
            misses[name] = 0 if ok else misses.get(name, 0) + 1
            if misses[name] >= MISSES and not stopping.is_set():
                _say(node=name, state="lost", detail=detail)
                del keepers.watched[name], misses[name]  # its name may join again


def _connect(address: str) -> None:
    """`ray.init`, again while the cluster does not answer: a head that is still starting
    (its Ray Client server last) refuses connections for a while, longer on a busy machine
    than Ray Client's own 30 s of retries."""
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while True:
        try:
            ray.init(
                address=address, namespace=NAMESPACE, logging_level=logging.ERROR,
                log_to_driver=False,
            )  # fmt: skip
            return
        except ConnectionError as exc:
            if time.monotonic() > deadline:
                raise
            print(f"Ray at {address} does not answer yet ({exc}); retrying", file=sys.stderr)
            time.sleep(2)


def main() -> None:
    plan = json.loads(sys.stdin.readline())
    _connect(plan["address"])
    keepers = Keepers(plan)
    keepers.start_named()
    keepers.join_new()
    _say(state="joined")
    stopping = threading.Event()
    watch = threading.Thread(target=_watch, args=(keepers, stopping), daemon=True)
    watch.start()
    sys.stdin.read()  # until the front closes it
    stopping.set()  # the nodes stopped now are not lost
    watch.join(timeout=START_TIMEOUT)
    keepers.stop()


if __name__ == "__main__":
    main()
