"""A sandbox's public states and why it ended.

creating ──> running ⇄ paused
             running ⇄ hibernated                   (memory and files on disk; gvisor)
any state ──> terminated                            (with an EndReason)

The engine enforces these transitions, with the moments in between that callers never see,
in one place: `corral.engine.record`.
"""

from __future__ import annotations

from enum import StrEnum

from corral.core.errors import InvalidRequest, InvalidState


class SandboxState(StrEnum):
    """Where a sandbox is in its life."""

    CREATING = "creating"
    RUNNING = "running"
    PAUSED = "paused"
    HIBERNATED = "hibernated"
    TERMINATED = "terminated"


class EndReason(StrEnum):
    """Why a sandbox ended; every terminated sandbox records exactly one."""

    EXITED = "exited"  # its agent (and so its process tree) exited on its own
    TIMEOUT = "timeout"  # its lifetime ran out
    USER = "terminated_by_user"
    OUT_OF_MEMORY = "out_of_memory"
    ENGINE_SHUTDOWN = "engine_shutdown"
    RUNTIME_ERROR = "runtime_error"  # the runtime failed to start it or it died unexpectedly
    IDLE = "idle"  # unused for its idle_timeout, with on_idle="terminate"
    KEY_REVOKED = "key_revoked"  # the API key that owned it was revoked
    ADMIN = "terminated_by_admin"  # an admin key ended it
    NODE_LOST = "node_lost"  # the cluster lost the node that ran it (corral.server.cluster)


def require_state(
    sandbox_id: str, action: str, current: SandboxState, *allowed: SandboxState
) -> None:
    """Raise `InvalidState` unless the sandbox is in one of `allowed` states for `action`."""
    if current not in allowed:
        wanted = " or ".join(str(state) for state in allowed)
        raise InvalidState(
            f"cannot {action} sandbox {sandbox_id} in state {current}; it must be {wanted}"
        )


def parse_state(value: SandboxState | str) -> SandboxState:
    """The state named `value`, or `InvalidRequest` listing the states (for filters)."""
    try:
        return SandboxState(value)
    except ValueError:
        states = ", ".join(s.value for s in SandboxState)
        raise InvalidRequest(f"unknown state {value!r}; use one of {states}") from None
