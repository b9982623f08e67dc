"""Encryption at rest: a sandbox's memory and environment reach the server's disk only sealed."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import corral
from corral import Sandbox, SandboxState
from tests.conftest import require_runtime
from tests.e2e.conftest import Server

HOLDER = """
import sys, time
held = ("in-memory-" + sys.argv[1]).encode()  # built here: only this process's memory has it
open("/tmp/ready", "w").close()
while True:
    time.sleep(1)
"""


def files_holding(root: Path, needles: list[bytes]) -> list[str]:
    """Every file under `root` (on its filesystem, links not followed) holding a needle."""
    found = []
    device = root.stat().st_dev
    overlap = max(len(n) for n in needles)
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if (Path(directory) / d).lstat().st_dev == device]
        for name in names:
            path = Path(directory) / name
            if not path.is_file() or path.is_symlink():
                continue
            with path.open("rb") as handle:
                tail = b""
                while chunk := handle.read(1 << 22):
                    window = tail + chunk
                    if any(needle in window for needle in needles):
                        found.append(str(path.relative_to(root)))
                        break
                    tail = window[-overlap:]
    return found


def test_hibernated_memory_and_env_are_sealed_on_disk(
    server: Server, client: corral.Client
) -> None:
    require_runtime("gvisor")
    env_marker = "env-" + secrets.token_hex(12)
    memory_marker = secrets.token_hex(12)
    needles = [env_marker.encode(), f"in-memory-{memory_marker}".encode()]
    with Sandbox.create(
        runtime="gvisor", env={"API_TOKEN": env_marker}, timeout=300, client=client
    ) as sandbox:
        holder = sandbox.exec("python3", "-c", HOLDER, memory_marker)
        deadline = time.monotonic() + 30
        while not sandbox.files.exists("/tmp/ready"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        control = server.data_dir / "control.txt"  # the search finds what is there in the clear
        control.write_bytes(b"x" * 5000 + needles[1] + b"y" * 5000)
        assert files_holding(server.data_dir, needles) == ["control.txt"]
        control.unlink()
        sandbox.hibernate()
        snapshot = None
        try:
            assert (server.data_dir / "sandboxes" / sandbox.id / "checkpoint").is_dir()
            assert files_holding(server.data_dir, needles) == []
            # Woken, it is where it was: the process, its memory, its environment.
            assert sandbox.run("echo $API_TOKEN").stdout == env_marker + "\n"
            assert sandbox.info().state is SandboxState.RUNNING
            listed = sandbox.run(f"ps -o args= -p {holder.pid}").stdout
            assert memory_marker in listed
            snapshot = sandbox.snapshot()
            assert files_holding(server.data_dir, needles) == []
        finally:
            if snapshot is not None:
                client.delete_snapshot(snapshot.id)
