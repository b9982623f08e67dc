"""What a sandbox must never reach, checked the way an attacker would try, under every runtime."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.core.errors import FileNotFound
from corral.core.models import SandboxInfo
from corral.core.spec import SandboxSpec
from corral.engine import Engine
from corral.host.cgroups import Cgroup
from corral.host.userns import UID_BASE

SECRET = "corral-host-secret-4f1d"


@pytest.fixture
def host_secret(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A world-readable file on the host that no sandbox may read."""
    directory = Path("/var/tmp") / f"corral-secret-{os.getpid()}"
    directory.mkdir(exist_ok=True)
    directory.chmod(0o755)
    path = directory / "secret.txt"
    path.write_text(SECRET)
    path.chmod(0o644)
    yield path
    path.unlink()
    directory.rmdir()


@pytest.fixture
def host_server() -> Iterator[int]:
    """A TCP service on the host's loopback (and every address), answering with the secret."""
    server = socket.create_server(("0.0.0.0", 0))
    port = server.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(SECRET.encode())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield port
    stop.set()
    thread.join()
    server.close()


async def sh(engine: Engine, sandbox: SandboxInfo, cmd: str) -> str:
    result = await engine.run(sandbox.id, cmd, timeout=60)
    return (result.stdout + result.stderr).decode(errors="replace")


PY_CONNECT = """
import socket, sys
for host in sys.argv[2:]:
    try:
        s = socket.create_connection((host, int(sys.argv[1])), timeout=2)
        print("CONNECTED", host, s.recv(100))
    except OSError as e:
        print("refused", host, e)
"""


def host_addresses() -> list[str]:
    """The host's own IPv4 addresses (loopback included)."""
    import subprocess

    out = subprocess.run(
        ["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True
    ).stdout
    return [line.split()[3].split("/")[0] for line in out.splitlines()]


async def test_cannot_see_host_processes(engine: Engine, sandbox: SandboxInfo) -> None:
    out = await sh(
        engine,
        sandbox,
        "cat /proc/[0-9]*/cmdline | tr '\\0' ' '; echo; ls /proc | grep -c '^[0-9]'",
    )
    assert "pytest" not in out
    assert "process_api" not in out
    assert int(out.split()[-1]) < 20  # only the sandbox's own few processes


async def test_cannot_read_host_files(
    engine: Engine, sandbox: SandboxInfo, host_secret: Path
) -> None:
    out = await sh(
        engine,
        sandbox,
        f"cat {host_secret}; cat /proc/*/root{host_secret}; cat /proc/1/environ; echo done",
    )
    assert SECRET not in out
    assert "done" in out
    files = engine.files(sandbox.id)
    for path in (str(host_secret), f"/../../..{host_secret}", f"/proc/1/root{host_secret}"):
        with pytest.raises(FileNotFound):
            await files.read_bytes(path)


async def test_symlinks_and_hardlinks_stay_inside(
    engine: Engine, sandbox: SandboxInfo, host_secret: Path
) -> None:
    files = engine.files(sandbox.id)
    await sh(
        engine,
        sandbox,
        f"ln -s {host_secret} /root/to-secret; ln -s ../../../../../etc/passwd /root/up",
    )
    with pytest.raises(FileNotFound):
        await files.read_bytes("/root/to-secret")
    # A symlink out of the sandbox resolves to the sandbox's own /etc/passwd.
    assert b"root:x:0:0" in await files.read_bytes("/root/up")
    # Writing "through" a symlink never touches the host.
    await sh(engine, sandbox, f"mkdir -p {host_secret.parent}")
    await files.write("/root/to-secret", b"overwritten")
    assert host_secret.read_text() == SECRET
    # Hard links to files the sandbox can see but not write are refused.
    out = await sh(
        engine, sandbox, "ln /run/corral/agent/guest.py /root/agent-link 2>&1; echo rc=$?"
    )
    assert "rc=0" not in out


async def test_cannot_write_the_shared_image(engine: Engine, runtime: str) -> None:
    first = await engine.create(SandboxSpec(runtime=runtime))
    second = await engine.create(SandboxSpec(runtime=runtime))
    try:
        await sh(engine, first, "echo pwned > /usr/bin/ls; echo x > /etc/marker-from-first")
        image = Path(engine.images.resolve("debian").layers[0])
        assert not (image / "etc/marker-from-first").exists()
        assert b"pwned" not in (image / "usr/bin/ls").read_bytes()
        out = await sh(engine, second, "cat /etc/marker-from-first 2>&1; ls -d /usr/bin")
        assert "No such file" in out
        assert "/usr/bin" in out
    finally:
        await engine.terminate(first.id)
        await engine.terminate(second.id)


async def test_cannot_see_other_sandboxes(engine: Engine, runtime: str) -> None:
    first = await engine.create(SandboxSpec(runtime=runtime))
    second = await engine.create(SandboxSpec(runtime=runtime))
    try:
        await engine.files(first.id).write("/root/first-secret.txt", SECRET)
        await engine.exec(first.id, ["sleep", "1234"])
        out = await sh(
            engine,
            second,
            f"cat /proc/*/cmdline | tr '\\0' ' '; grep -rl {SECRET} /root /tmp /proc/*/root/root 2>/dev/null; echo end",
        )
        assert "1234" not in out
        assert "first-secret" not in out
        with pytest.raises(FileNotFound):
            await engine.files(second.id).read_bytes("/root/first-secret.txt")
    finally:
        await engine.terminate(first.id)
        await engine.terminate(second.id)


async def test_no_network_by_default(
    engine: Engine, sandbox: SandboxInfo, host_server: int
) -> None:
    targets = ["127.0.0.1", *host_addresses(), "1.1.1.1"]
    out = await sh(engine, sandbox, f"python3 -c '{PY_CONNECT}' {host_server} {' '.join(targets)}")
    assert "CONNECTED" not in out
    out = await sh(
        engine,
        sandbox,
        "python3 -c \"import socket; print(socket.getaddrinfo('pypi.org', 443))\" 2>&1 | tail -1",
    )
    assert "gaierror" in out or "Temporary failure" in out or "Errno" in out


async def test_internet_reaches_out_but_never_the_host(
    engine: Engine, runtime: str, host_server: int
) -> None:
    info = await engine.create(SandboxSpec(runtime=runtime, network="internet"))
    other = await engine.create(SandboxSpec(runtime=runtime, network="internet"))
    try:
        other_ip = (
            await sh(
                engine,
                other,
                'hostname -I 2>/dev/null || python3 -c "import socket;print(socket.gethostbyname(socket.gethostname()))"',
            )
        ).split()[0]
        gateway = (
            await sh(
                engine,
                info,
                "ip route 2>/dev/null | awk '/default/{print $3}'; awk '$2==\"00000000\"{print $3}' /proc/net/route",
            )
        ).split()
        targets = ["127.0.0.1", *host_addresses(), other_ip, "169.254.169.254"]
        out = await sh(engine, info, f"python3 -c '{PY_CONNECT}' {host_server} {' '.join(targets)}")
        assert "CONNECTED" not in out, out
        assert gateway  # it has a route out
        download = await engine.run(
            info.id,
            "pip download --no-deps --disable-pip-version-check -d /tmp/dl six && ls /tmp/dl",
            timeout=240,
        )
        assert download.exit_code == 0, download.stderr.decode(errors="replace")
        assert b"six-" in download.stdout
    finally:
        await engine.terminate(info.id)
        await engine.terminate(other.id)


async def test_cannot_mount_or_make_namespaces(engine: Engine, sandbox: SandboxInfo) -> None:
    out = await sh(
        engine,
        sandbox,
        "mount -t tmpfs none /mnt 2>&1; echo mount=$?; unshare -m true 2>&1; echo mountns=$?; "
        "unshare -n true 2>&1; echo netns=$?; unshare -U true 2>&1; echo userns=$?",
    )
    assert "mount=0" not in out, out
    assert "mountns=0" not in out, out
    assert "netns=0" not in out, out
    if sandbox.runtime == "namespaces":
        assert "userns=0" not in out, out
    # Under gVisor a user namespace is an object of the Sentry's own kernel, never the host's.


# Address families with no use in a sandbox and a record of kernel bugs (vsock also reaches the
# hypervisor). Netlink and packet sockets are the Sentry's own under gVisor, the host's otherwise.
EXOTIC_FAMILIES = {"vsock": 40, "alg": 38, "tipc": 30, "rds": 21, "xdp": 44, "can": 29, "key": 15}
HOST_ONLY_FAMILIES = {"netlink": 16, "packet": 17, "bluetooth": 31, "x25": 9, "smc": 43}

PY_FAMILIES = """
import errno, socket, sys
for pair in sys.argv[1:]:
    name, family = pair.split("=")
    for kind in (1, 2, 3, 5):
        for call in (socket.socket, socket.socketpair):
            try:
                call(int(family), kind)
            except OSError:
                continue
            print("OPENED", name, call.__name__, kind)
for family in (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6):
    socket.socket(family, socket.SOCK_STREAM).close()
print("usual families work")
"""


async def test_socket_families_are_an_allow_list(engine: Engine, sandbox: SandboxInfo) -> None:
    families = dict(EXOTIC_FAMILIES)
    if sandbox.runtime == "namespaces":
        families |= HOST_ONLY_FAMILIES
    pairs = " ".join(f"{name}={number}" for name, number in families.items())
    out = await sh(engine, sandbox, f"python3 -c '{PY_FAMILIES}' {pairs}")
    assert "OPENED" not in out, out
    assert "usual families work" in out, out


async def test_cannot_trace_or_poke_its_agent(engine: Engine, sandbox: SandboxInfo) -> None:
    script = (
        "import ctypes, os, glob\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "agent = next(int(p.split('/')[2]) for p in glob.glob('/proc/[0-9]*/cmdline')"
        " if b'/run/corral/agent/start.py' in open(p, 'rb').read())\n"
        "print('ptrace', libc.ptrace(16, agent, 0, 0), ctypes.get_errno())\n"
        "try:\n"
        "    open(f'/proc/{agent}/mem', 'rb').read(1); print('MEM READ')\n"
        "except OSError as e:\n"
        "    print('mem refused', e.errno)\n"
    )
    out = await sh(engine, sandbox, f'python3 -c "{script}"')
    assert "ptrace -1" in out, out
    assert "MEM READ" not in out
    assert "mem refused" in out


async def test_cannot_raise_its_own_limits(engine: Engine, runtime: str) -> None:
    info = await engine.create(SandboxSpec(runtime=runtime, memory_mb=128, max_processes=64))
    try:
        out = await sh(
            engine,
            info,
            "for f in /sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max "
            "/sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/pids/pids.max; do "
            "echo max > $f 2>/dev/null && echo WROTE $f; done; "
            "python3 -c 'import resource; resource.setrlimit(resource.RLIMIT_NPROC, (10**6, 10**6)); print(\"RAISED\")' 2>&1 | tail -1",
        )
        assert "WROTE" not in out
        cgroup = Cgroup(f"corral/{info.id}")
        if cgroup.exists():
            assert cgroup.pids()
    finally:
        await engine.terminate(info.id)


async def test_root_inside_is_unprivileged_outside(engine: Engine, sandbox: SandboxInfo) -> None:
    await engine.exec(sandbox.id, ["sleep", "4321"])
    cgroup = Cgroup(f"corral/{sandbox.id}")
    uids = {}
    for pid in cgroup.pids():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[2])
        uids[cmdline.split(b"\0")[0].decode(errors="replace")] = uid
    assert uids
    # Every host process of the sandbox (bwrap's tree; gVisor's Sentry and Gofer) runs as an
    # unprivileged uid of the sandbox's private range, never as root.
    assert all(uid >= UID_BASE for uid in uids.values()), uids


async def test_host_environment_does_not_leak(engine: Engine, runtime: str) -> None:
    os.environ["CORRAL_TEST_LEAK"] = SECRET
    try:
        info = await engine.create(SandboxSpec(runtime=runtime, env={"VISIBLE": "yes"}))
        out = await sh(engine, info, "env; cat /proc/1/environ | tr '\\0' '\\n'")
        assert SECRET not in out
        assert "VISIBLE=yes" in out
        await engine.terminate(info.id)
    finally:
        del os.environ["CORRAL_TEST_LEAK"]
