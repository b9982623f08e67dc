"""A real PostgreSQL server for the tests: Debian's `postgresql` package (scripts/setup --dev
installs it), a throwaway cluster bound to 127.0.0.1 on a free port, one database per test.

Run as root (as CI does), the server runs as the `postgres` user, which PostgreSQL requires.
A machine without PostgreSQL fails these tests rather than skipping them."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

START_TIMEOUT = 60.0


def _bin_dir() -> Path:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=_version)
    if not versions:
        pytest.fail("PostgreSQL is not installed: run scripts/setup --dev (Debian's postgresql)")
    return versions[-1].parent


def _version(path: Path) -> int:
    return int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Postgres:
    """One running PostgreSQL server; `database()` makes a fresh database and its URL."""

    def __init__(self, root: Path) -> None:
        self.bin = _bin_dir()
        self.root = root
        self.port = _free_port()
        self.user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        self.process: subprocess.Popen[bytes] | None = None
        self.count = 0

    def _as_owner(self, *argv: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else list(argv)

    def start(self) -> None:
        data = self.root / "data"
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        subprocess.run(
            self._as_owner(str(self.bin / "initdb"), "-D", str(data), "-A", "trust", "-U",
                           "corral", "--no-sync", "-E", "UTF8"),
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        with (self.root / "server.log").open("wb") as log:
            self.process = subprocess.Popen(
                self._as_owner(str(self.bin / "postgres"), "-D", str(data), "-h", "127.0.0.1",
                               "-p", str(self.port), "-k", str(self.root), "-F",
                               "-c", "max_connections=200"),
                stdout=subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while self._psql("SELECT 1", check=False).returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = (self.root / "server.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"PostgreSQL did not start:\n{log}")
            time.sleep(0.1)

    def _psql(self, sql: str, *, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        argv = [str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "corral",
                "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-c", sql]  # fmt: skip
        return subprocess.run(argv, check=check, capture_output=True, timeout=60)

    def database(self) -> str:
        """A new, empty database; its URL."""
        self.count += 1
        name = f"corral_{os.getpid()}_{self.count}"
        self._psql(f"CREATE DATABASE {name}")
        return f"postgresql://corral@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # a "smart" shutdown once clients leave, "fast" below
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(10)


@contextlib.contextmanager
def running_postgres() -> Iterator[Postgres]:
    root = Path(tempfile.mkdtemp(prefix="corral-pg-", dir="/var/tmp"))
    server = Postgres(root)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
