"""A Ray cluster of N nodes on this machine (`corral serve --cluster local:N`), for trying
cluster mode out and for the tests.

Ray's servers listen on every address whatever `--node-ip-address` says (Ray 2.60), so the
whole cluster runs in a network namespace of its own that has only a loopback: nothing of Ray
can be reached from outside it, not even from this host. Each node's Corral server is started
back in the host's network namespace (through a handle on it, `hostnet`), where its sandboxes'
networks are and where the front reaches it on 127.0.0.1. Node k offers the Ray resource
``corral_node_k``, which pins its actor there.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from corral.core.errors import ServiceUnavailable

HEAD_PORT = 6379  # inside the cluster's own network namespace: no other Ray can be there


def resource(index: int) -> str:
    return f"corral_node_{index}"


class LocalRay:
    """Ray's head and workers, `count` nodes, in the network namespace `netns`."""

    def __init__(self, directory: Path, count: int) -> None:
        self.count = count
        tag = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:8]
        self.netns = f"corral-ray-{tag}"
        self.hostnet = directory / "hostnet"  # the host's network namespace, held open
        # Ray's sockets live under its temp dir, and a Unix socket path holds 107 bytes.
        self.temp_dir = Path("/tmp") / self.netns
        self.address = f"127.0.0.1:{HEAD_PORT}"
        self._ray = str(Path(sys.executable).parent / "ray")

    def start(self) -> None:
        self.stop()  # what a crashed front left
        try:
            self._start()
        except BaseException:
            self.stop()  # a half-started cluster leaves no process, namespace or mount behind
            raise

    def _start(self) -> None:
        self._run(["ip", "netns", "add", self.netns])
        self._run(["ip", "-n", self.netns, "link", "set", "lo", "up"])
        self.hostnet.touch()
        self._run(["mount", "--bind", "/proc/self/ns/net", str(self.hostnet)])
        for index in range(self.count):
            role = (
                ["--head", f"--port={HEAD_PORT}", "--include-dashboard=false"]
                if index == 0
                else [f"--address={self.address}"]
            )
            self._run(
                [
                    *self.in_netns([self._ray]), "start", *role,
                    "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp_dir}",
                    "--num-cpus=1", f'--resources={{"{resource(index)}": 1}}',
                    "--disable-usage-stats",
                ],
                timeout=180,
            )  # fmt: skip

    def in_netns(self, argv: list[str]) -> list[str]:
        """`argv` run inside the cluster's network namespace. Not `ip netns exec`: that also
        makes a mount namespace with its own /sys, where no cgroup hierarchy is mounted, and
        the node servers started from inside would inherit it."""
        return ["nsenter", f"--net=/run/netns/{self.netns}", *argv]

    def on_host(self, argv: list[str]) -> list[str]:
        """`argv` run from inside the cluster back in the host's network namespace."""
        return ["nsenter", f"--net={self.hostnet}", *argv]

    def processes(self, index: int | None = None) -> list[int]:
        """The cluster's processes: those in its network namespace (node `index`'s raylet
        only, if given)."""
        try:
            ours = os.stat(f"/run/netns/{self.netns}").st_ino
        except OSError:
            return []
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.stat(entry / "ns" / "net").st_ino != ours:
                    continue
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if index is None or (b"raylet" in cmdline and resource(index).encode() in cmdline):
                found.append(int(entry.name))
        return found

    def kill_node(self, index: int) -> None:
        """SIGKILL node `index`'s raylet, as a machine that dies (tests)."""
        for pid in self.processes(index):
            os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        """Kill every process of the cluster and remove its namespace (nothing there is fine)."""
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, check=False)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        if self.hostnet.exists():
            subprocess.run(["umount", str(self.hostnet)], capture_output=True, check=False)
            self.hostnet.unlink(missing_ok=True)

    def _run(self, argv: list[str], timeout: float = 60) -> None:
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        try:
            subprocess.run(argv, capture_output=True, text=True, check=True, timeout=timeout,
                           env=env)  # fmt: skip
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", None) or str(exc)
            raise ServiceUnavailable(
                f"cannot start the local Ray cluster ({' '.join(argv[:6])}…): "
                f"{detail.strip()[-500:]}; is Ray installed (pip install 'corral[cluster]')?",
                code="cluster_unavailable",
            ) from None
