"""How the guest agent keeps sandboxed code away from itself: it holds the sandbox's secret
and is the only process whose word the host takes.

Standard library only, for any Python >= 3.8, like the rest of the agent.
"""

from __future__ import annotations

import os
import sys

try:
    from corral.agent.lean import signal
except ImportError:  # inside the sandbox the agent directory itself is on sys.path
    from lean import signal  # type: ignore[import-not-found,no-redef]

TYPE_CHECKING = False  # `typing` is for annotations only: 2 ms of every agent's start (aio)
if TYPE_CHECKING:
    from typing import Any


def harden() -> None:
    """Keep sandboxed code away from the agent: no core dumps, ptrace or /proc access to its
    memory (it holds the sandbox's secret), no signal it has not asked for (as pid 1 it gets
    only those)."""
    try:
        import ctypes  # noqa: PLC0415 - only here, to say clearly when it is missing

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE = 0
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE) failed")
    except (OSError, AttributeError, ImportError) as exc:
        # Without it, any process of the sandbox's uid could read the secret from memory.
        sys.stderr.write(
            "corral agent: cannot protect itself (%s); the image's python3 needs ctypes\n" % (exc,)
        )
        sys.exit(3)
    # As pid 1 under bubblewrap the kernel already drops every signal it does not handle; the
    # Sentry does not, so a handler (a no-op: reset to the default in every program the agent
    # starts) keeps `kill -TERM 1` and the like from ending it. SIGKILL and SIGSTOP cannot be
    # handled: under gVisor the engine notices an agent that stops answering and ends the
    # sandbox, saying why (never a silent hang, never a stand-in).
    faults = {signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGABRT}
    faults |= {signal.SIGSYS, signal.SIGTRAP}
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD) or sig in faults:
            continue
        try:
            signal.signal(sig, _ignore)
        except (OSError, ValueError):  # reserved by the C library (some real-time signals)
            pass


def _ignore(_signum: int, _frame: Any) -> None:
    pass


def quiet() -> None:
    """Leave the host's stdio: it may be a pipe the host stops reading."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


_CAP_SYS_ADMIN = 21
_SECRET_BYTES = 32  # protocol.SECRET_BYTES (the agent's modules import no sibling here)
_CAP_VERSION_3 = 0x20080522


def take_identity(hostname: Any, secret: Any) -> bytes:
    """Take the name of the sandbox this agent now serves, then give up the right to; return
    `secret` (hex), the sandbox's own, which replaces the boot image's every restored sandbox
    holds. ValueError for parameters that are not a name and 32 bytes in hex.

    Only the agent of a boot image (a booted sandbox saved to start others from) is started
    holding CAP_SYS_ADMIN, and only in its own effective and permitted sets: never in the
    bounding or inheritable ones, so no program it starts ever gets it. Each sandbox restored
    from the image renames itself once, here, before the host hands it to anyone."""
    if not isinstance(hostname, str) or not hostname:
        raise ValueError("hostname must be a non-empty string")
    try:
        new = bytes.fromhex(secret) if isinstance(secret, str) else b""
    except ValueError:
        new = b""
    if len(new) != _SECRET_BYTES:
        raise ValueError("secret must be %d bytes in hex" % _SECRET_BYTES)
    import _socket as socket  # noqa: PLC0415 - without `socket`'s wrapper (see `lean`)
    import ctypes  # noqa: PLC0415 - as in `harden`

    socket.sethostname(hostname)
    libc = ctypes.CDLL(None, use_errno=True)
    header = (ctypes.c_uint32 * 2)(_CAP_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable: caps 0-31, then 32-63
    if libc.capget(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    data[0] &= ~(1 << _CAP_SYS_ADMIN) & 0xFFFFFFFF
    data[1] &= ~(1 << _CAP_SYS_ADMIN) & 0xFFFFFFFF
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")
    return new
