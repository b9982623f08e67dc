"""The engine's data directory: where it is, who may use it, and what it holds.

<data>/engine.lock     held by the one engine using the directory
<data>/agent/          the guest agent's code, its `leader` program and `leader-<hash>.so`
                       libraries (built here from leader.c), bound read-only into every sandbox
<data>/bin/            the engine's own `enter` and `reaper` programs (built here from
                       runtimes/enter.c and reaper.c)
<data>/sandboxes/      one directory per sandbox: its record, plan, disk and sockets
<data>/images/         built-in images, layers, manifests, uploaded blobs
<data>/snapshots/      memory snapshots
<data>/volumes/        persistent volumes
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import platform
import py_compile
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from corral.core.errors import Conflict, SandboxFailed

log = logging.getLogger("corral.engine")
HASH = py_compile.PycInvalidationMode.CHECKED_HASH

AGENT_FILES = (
    "start.py",
    "guest.py",
    "aio.py",
    "aiosync.py",
    "aiostreams.py",
    "lean.py",
    "contexts.py",
    "kernel.py",
    "kernel.js",
    "kernel_bash.py",
    "execution.py",
    "fileops.py",
    "ports.py",
    "memory.py",
    "procs.py",
    "shell.py",
    "protocol.py",
    "shield.py",
    "tree.py",
)


def default_data_dir() -> Path:
    """/var/lib/corral for root, else the user's data directory."""
    if os.geteuid() == 0:
        return Path("/var/lib/corral")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "corral"


def lock_data_dir(data_dir: Path) -> int:
    """Take the data directory for this engine alone; the lock goes with the fd (or process).

    A second engine on the same directory would adopt the first one's sandboxes and take over
    their agents' sockets, cutting the first off from them, so it is refused instead.
    """
    fd = os.open(data_dir / "engine.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise Conflict(
            f"another Corral engine uses the data directory {data_dir} (is `corral serve` "
            "already running?); stop it, or choose another --data-dir",
            code="data_dir_in_use",
        ) from None
    return fd


def prepare_data_dir(data_dir: Path) -> None:
    """Make the directory's skeleton with the permissions sandboxes need (the guest agent's
    code is installed by the engine once it holds the directory's lock: `install_agent`)."""
    for directory in (data_dir, data_dir / "sandboxes", data_dir / "agent", data_dir / "images"):
        # A dangling link (to a directory that another setup removed) is a clear error, not
        # a FileExistsError from deep inside.
        if directory.is_symlink() and not directory.exists():
            raise SandboxFailed(
                f"{directory} is a link to {os.readlink(directory)}, which does not exist; "
                "create that directory or remove the link",
                code="bad_data_dir",
            )
        directory.mkdir(parents=True, exist_ok=True)
        # Sandboxes run as unprivileged host uids that must reach their own directory,
        # the agent's code and the images: traverse, but never list or write.
        directory.chmod(0o711)
    for parent in data_dir.resolve().parents:
        if not parent.stat().st_mode & 0o001:
            raise SandboxFailed(
                f"data directory {data_dir} is inside {parent}, which other users cannot "
                "enter; sandboxes run as unprivileged users and must reach it. Choose another "
                "data directory (default /var/lib/corral)",
                code="bad_data_dir",
            )


def install_programs(data_dir: Path) -> None:
    """Install what the engine runs from `data_dir`: the guest agent and its own tools."""
    install_agent(data_dir / "agent")
    install_tools(data_dir / "bin")


def install_agent(agent_dir: Path) -> None:
    """Write the guest agent's code into `agent_dir` where it differs, atomically per file,
    with its modules compiled for this Python's version: an image with the same version then
    imports them without compiling them at every start (the directory is read-only there)."""
    agent_dir.chmod(0o755)  # Python lists a directory to import from it
    for name in AGENT_FILES:
        source = resources.files("corral.agent").joinpath(name).read_bytes()
        target = agent_dir / name
        changed = not target.exists() or target.read_bytes() != source
        if changed:
            _write(target, source)
        compiled = Path(importlib.util.cache_from_source(str(target)))
        if name.endswith(".py") and name != "start.py" and (changed or not compiled.exists()):
            # Checked by the source's hash: a stale file is never used, only recompiled.
            py_compile.compile(str(target), str(compiled), doraise=True, invalidation_mode=HASH)
    build_leader(agent_dir)


def _write(target: Path, data: bytes) -> None:
    temp = target.with_name(f".{target.name}.tmp")
    temp.write_bytes(data)
    temp.chmod(0o644)
    os.replace(temp, target)


LEADER_FLAGS = ("-static", "-nostdlib", "-ffreestanding", "-fno-stack-protector", "-O2", "-s")
LIBRARY_FLAGS = ("-shared", "-fPIC", *LEADER_FLAGS[1:], "-Wl,-z,defs", "-DCORRAL_LIBRARY")
LIBRARY_POINTER = "leader.lib"  # names the library agents load (agent.procs.LIBRARY)
ENTER_FLAGS = ("-O2", "-s")


def build_leader(agent_dir: Path) -> bool:
    """Build the agent's `leader` program from leader.c, statically and without a C library
    (see leader.c) so that it runs in any image, and the same steps as a library the agent
    loads (x86-64 only; without it the program serves, a few ms slower under gVisor).
    Whether the program is there: without it commands still run, but start slower (see
    agent.procs).

    The library is named by a hash of its source and flags, never replaced in place, and the
    old ones are kept: an agent keeps the one it loaded mapped for its whole life, and a gVisor
    sandbox restored from a snapshot taken before an upgrade maps it again by its name. The
    file `leader.lib` names the one new agents load."""
    slower = "commands in sandboxes start"
    built = _build("corral.agent", "leader", LEADER_FLAGS, agent_dir, slower)
    pointer = agent_dir / LIBRARY_POINTER
    if platform.machine() not in ("x86_64", "AMD64"):
        pointer.unlink(missing_ok=True)
        return built
    source = resources.files("corral.agent").joinpath("leader.c").read_bytes()
    library = f"leader-{_made_from(source, LIBRARY_FLAGS)[:16]}.so"
    if _build("corral.agent", "leader", LIBRARY_FLAGS, agent_dir, slower, output=library):
        if not pointer.exists() or pointer.read_text() != library:
            _write(pointer, library.encode())
    else:
        pointer.unlink(missing_ok=True)
    return built


def install_tools(tools_dir: Path) -> bool:
    """Build the engine's own programs into `tools_dir`: `enter` (runtimes/enter.c) and
    `reaper` (runtimes/reaper.c). Whether both are there: without them sandboxes still start
    and end, but slower (runtimes.base.spawn, runtimes.gvisor.run_reaped)."""
    tools_dir.mkdir(mode=0o700, exist_ok=True)
    entered = _build(
        "corral.runtimes", "enter", ENTER_FLAGS, tools_dir, "namespaces sandboxes start"
    )
    reaped = _build("corral.runtimes", "reaper", ENTER_FLAGS, tools_dir, "gVisor sandboxes end")
    return entered and reaped


def _build(
    package: str,
    name: str,
    flags: tuple[str, ...],
    directory: Path,
    slower: str,
    *,
    output: str | None = None,
) -> bool:
    """Build `directory/name` from `package`'s `name.c` with the host's C compiler (`$CC`,
    else cc); kept while its source and flags are unchanged (`name.built` says what it was
    built from). Whether it is there. With `output`, build that file instead, whose name says
    what it was built from: kept once there, never replaced."""
    source = resources.files(package).joinpath(f"{name}.c").read_bytes()
    target = directory / (output or name)
    stamp, made_from = directory / f"{name}.built", _made_from(source, flags)
    if output is not None:
        if target.exists():
            return True
    elif target.exists() and stamp.exists() and stamp.read_text() == made_from:
        return True
    else:
        target.unlink(missing_ok=True)  # an old build may not understand the new caller
        (directory / f"{name}.c").unlink(missing_ok=True)  # the stamp of earlier versions
    compiler = shutil.which(os.environ.get("CC") or "cc")
    if compiler is None:
        log.warning("no C compiler (cc): %s slower; install gcc", slower)
        return False
    with tempfile.TemporaryDirectory(dir=directory, prefix=".build-") as work:
        (Path(work) / f"{name}.c").write_bytes(source)
        argv = [compiler, *flags, "-o", target.name, f"{name}.c"]
        done = subprocess.run(
            argv, cwd=work, capture_output=True, text=True, timeout=120, check=False
        )
        if done.returncode != 0:
            log.warning("cannot build %s: %s", target.name, done.stderr.strip())
            return False
        os.chmod(Path(work) / target.name, 0o755)  # noqa: S103 - every sandbox user runs it
        os.replace(Path(work) / target.name, target)
    if output is None:
        _write(stamp, made_from.encode())
    return True


def _made_from(source: bytes, flags: tuple[str, ...]) -> str:
    return hashlib.sha256(source + "\0".join(flags).encode()).hexdigest()
