"""Only Corral's agent speaks for a sandbox: a rogue process inside, root included, cannot find
the agent's socket, take over its connection, signal it away, or read its secret, under every
runtime, and across hibernation, wake and fork. Where it can stop or kill the agent (SIGSTOP and
SIGKILL reach pid 1 under gVisor), the sandbox ends and says why: never a hang, never a stand-in.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import pytest

from corral.core.errors import InvalidState, SandboxEnded
from corral.core.models import SandboxInfo
from corral.core.spec import SandboxSpec
from corral.core.state import SandboxState
from corral.engine import Engine
from tests.conftest import require_runtime

# What a process inside tries, as root: each line it prints says what happened.
ROGUE = r"""
import ctypes, os, signal, socket, sys
said = []
try:
    os.listdir("/run/corral/sock")
    said.append("LISTED the socket directory")
except PermissionError:
    said.append("list refused")
for name in ("agent.sock", "agent.key"):
    if os.path.exists("/run/corral/sock/" + name):
        said.append("FOUND " + name)
probe = socket.socket(socket.AF_UNIX)
try:
    probe.connect("/run/corral/sock/agent.sock")
    said.append("CONNECTED to the agent's socket")
except OSError:
    said.append("connect refused")
for name in sys.argv[1:]:
    try:
        os.kill(1, getattr(signal, name))
    except OSError:
        pass
try:
    with open("/proc/1/mem", "rb") as handle:
        handle.read(1)
    said.append("READ the agent's memory")
except OSError:
    said.append("memory refused")
libc = ctypes.CDLL(None, use_errno=True)
said.append("ptrace %d" % libc.ptrace(16, 1, 0, 0))  # PTRACE_ATTACH
heap = 0x400000
try:
    for line in open("/proc/1/maps"):
        if "[heap]" in line:
            heap = int(line.split("-")[0], 16)
except OSError:
    pass
class Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
buffer = ctypes.create_string_buffer(4096)
mine, theirs = Iovec(ctypes.cast(buffer, ctypes.c_void_p), 4096), Iovec(heap, 4096)
got = libc.process_vm_readv(1, ctypes.byref(mine), 1, ctypes.byref(theirs), 1, 0)
said.append("vm_readv %d" % got)
# Whatever of the agent's /proc files can be read: the test looks for the secret in it.
for name in ("environ", "cmdline", "maps", "status", "stat", "auxv"):
    try:
        said.append("%s %s" % (name, open("/proc/1/" + name, "rb").read().hex()))
    except OSError:
        pass
print("\n".join(said))
"""


# Every signal a process can handle: the agent handles them all (no-ops), so none ends it.
HANDLED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGTSTP")


async def attack_and_check(engine: Engine, sandbox_id: str, signals: tuple[str, ...]) -> None:
    """Run the rogue, then check that what comes back is still the agent's."""
    files = engine.files(sandbox_id)
    await files.write("/root/truth.txt", b"what the agent wrote")
    rogue = await engine.run(sandbox_id, ["python3", "-c", ROGUE, *signals])
    said = rogue.stdout.decode()
    assert rogue.exit_code == 0, rogue.stderr
    for refused in ("list refused", "connect refused", "memory refused", "ptrace -1", "readv -1"):
        assert refused in said, said
    for word in ("LISTED", "FOUND", "CONNECTED", "READ "):
        assert word not in said, said
    secret = engine.registry.get(sandbox_id).link.secret
    assert (
        secret is not None and secret.hex() not in said and secret.hex().encode().hex() not in said
    )
    # The agent is untouched: pid 1, running, answering, with the real files.
    info = engine.get(sandbox_id)
    assert info.state is SandboxState.RUNNING
    me = await engine.run(sandbox_id, "id -u; cat /proc/1/cmdline | tr '\\0' ' '")
    assert me.stdout.decode().startswith("0\n") and "start.py" in me.stdout.decode(), me
    assert await files.read_bytes("/root/truth.txt") == b"what the agent wrote"
    assert await engine.ping(sandbox_id) < 5


async def test_a_rogue_process_cannot_speak_for_the_agent(
    engine: Engine, sandbox: SandboxInfo, runtime: str
) -> None:
    # Under bubblewrap the kernel drops even SIGSTOP and SIGKILL sent to pid 1 from inside.
    signals = (*HANDLED, "SIGSTOP", "SIGKILL") if runtime == "namespaces" else HANDLED
    await attack_and_check(engine, sandbox.id, signals)
    # The signals were refused, not merely slow: it still runs commands a while later.
    assert (await engine.run(sandbox.id, "sleep 0.5; echo still here")).stdout == b"still here\n"


@pytest.mark.parametrize("signal_name", ["SIGSTOP", "SIGKILL"])
async def test_an_agent_stopped_or_killed_inside_ends_its_sandbox_with_the_reason(
    engine: Engine, signal_name: str
) -> None:
    """gVisor lets root inside stop or kill pid 1: the sandbox then ends, and says why, rather
    than leaving calls waiting forever."""
    require_runtime("gvisor")
    info = await engine.create(SandboxSpec(runtime="gvisor"))
    with contextlib.suppress(SandboxEnded):  # killed while it answered
        await engine.run(info.id, f"kill -{signal_name[3:]} 1 &", timeout=5)
    with pytest.raises((SandboxEnded, InvalidState)):  # ended during a call, or before one
        async with asyncio.timeout(120):  # only catches a hang: the check takes ~20 s
            while True:
                await engine.run(info.id, "true", timeout=5)
                await asyncio.sleep(0.5)
    ended = engine.get(info.id)
    assert ended.state is SandboxState.TERMINATED
    assert ended.end_reason is not None and ended.end_reason.value == "runtime_error"


async def test_hibernated_woken_and_forked_agents_hold_too(engine: Engine) -> None:
    require_runtime("gvisor")
    info = await engine.create(SandboxSpec(runtime="gvisor"))
    copies: list[SandboxInfo] = []
    try:
        await engine.hibernate(info.id)
        await engine.wake(info.id)
        await attack_and_check(engine, info.id, HANDLED)
        copies = await engine.fork(info.id, 2)
        for copy in copies:
            await attack_and_check(engine, copy.id, HANDLED)
        await attack_and_check(engine, info.id, HANDLED)
    finally:
        for made in (info, *copies):
            await engine.terminate(made.id)


async def test_a_dead_agent_ends_its_sandbox_with_the_reason(engine: Engine) -> None:
    """Never replaced: if the agent dies (here killed from the host, which nothing inside can
    do), the sandbox ends, and says so."""
    info = await engine.create(SandboxSpec(runtime="namespaces"))
    launch = engine.registry.get(info.id).launch
    assert launch is not None
    children = Path(f"/proc/{launch.pid}/task/{launch.pid}/children").read_text().split()
    assert len(children) == 1  # bubblewrap's one child: the agent, pid 1 inside
    os.kill(int(children[0]), signal.SIGKILL)
    for _ in range(200):  # a bound that only catches a hang
        if engine.get(info.id).state is SandboxState.TERMINATED:
            break
        await asyncio.sleep(0.05)
    ended = engine.get(info.id)
    assert ended.state is SandboxState.TERMINATED
    assert ended.end_reason is not None and ended.end_reason.value == "runtime_error"
    with pytest.raises(InvalidState):
        await engine.run(info.id, "true")
