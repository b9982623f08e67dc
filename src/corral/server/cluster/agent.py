"""The cluster's Ray driver: one actor per node that starts and keeps that node's Corral
server, and a watch that reports each node up or lost, as JSON lines on stdout.

Run by the front as ``python -m corral.server.cluster.agent`` with the plan on stdin:
``{"address": "127.0.0.1:6390", "nodes": [{"name", "resource", "argv", "env"}]}``; ``resource``
is the Ray resource only that node has (its actor is pinned there). Lines it prints:
``{"node": NAME, "state": "up"}`` once its server process runs, ``{"node": NAME, "state":
"lost", "detail": ...}`` when Ray reports the node or its actor dead. It ends when stdin closes
(the front is gone), taking the actors and their servers with it.
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
from typing import Any

import ray

PING_EVERY = 1.0
PING_TIMEOUT = 3.0
MISSES = 2  # consecutive failed pings before a node is lost
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the node server's process: SIGKILL when the actor's process dies (the node is
    lost), so no node server outlives its Ray node."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@ray.remote(num_cpus=0, max_restarts=0)
class NodeKeeper:
    """Starts one node's Corral server and answers for it while it runs."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self._server = subprocess.Popen(
            argv,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 (one call, before exec)
        )

    def alive(self) -> bool:
        return self._server.poll() is None

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


def _watch(keepers: dict[str, Any], stopping: threading.Event) -> None:
    misses = dict.fromkeys(keepers, 0)
    while keepers and not stopping.wait(PING_EVERY):
        for name, keeper in list(keepers.items()):
            try:
                ok = ray.get(keeper.alive.remote(), timeout=PING_TIMEOUT)
                detail = "its Corral server exited"
            except Exception as exc:  # the actor, its worker or its node is gone
                ok, detail = False, f"Ray lost it: {type(exc).__name__}"
            misses[name] = 0 if ok else misses[name] + 1
            if misses[name] >= MISSES and not stopping.is_set():
                _say(node=name, state="lost", detail=detail)
                del keepers[name]


def main() -> None:
    plan = json.loads(sys.stdin.readline())
    ray.init(address=plan["address"], logging_level=logging.ERROR, log_to_driver=False)
    keepers: dict[str, Any] = {}
    for node in plan["nodes"]:
        keeper = NodeKeeper.options(resources={node["resource"]: 0.001}).remote(  # type: ignore[attr-defined]
            node["argv"], node["env"]
        )
        ray.get(keeper.alive.remote())
        keepers[node["name"]] = keeper
        _say(node=node["name"], state="up")
    stopping = threading.Event()
    threading.Thread(target=_watch, args=(dict(keepers), stopping), daemon=True).start()
    sys.stdin.read()  # until the front closes it
    stopping.set()  # the nodes stopped now are not lost
    for keeper in keepers.values():
        with contextlib.suppress(Exception):  # a lost node has nothing left to stop
            ray.get(keeper.stop.remote(), timeout=90)


if __name__ == "__main__":
    main()
