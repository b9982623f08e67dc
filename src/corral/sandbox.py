"""The engine's record of one sandbox: its spec, plan, state, history and agent link.

State changes go through `Sandbox.move`, which asks `corral.state` whether they are legal, so
the state machine is enforced in exactly one place. Each change is saved to the sandbox's
directory (`sandbox.json`), from which a restarted engine adopts the sandbox
(`Sandbox.from_record`).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from corral.agentlink import AgentLink
from corral.models import SandboxInfo, StateChange
from corral.plan import SandboxPlan
from corral.runtimes import Launch
from corral.spec import SandboxSpec
from corral.state import EndReason, SandboxState, check_transition, require_state

RECORD_NAME = "sandbox.json"


class Sandbox:
    """One sandbox owned by the engine."""

    def __init__(self, spec: SandboxSpec, plan: SandboxPlan) -> None:
        self.id = plan.sandbox_id
        self.spec = spec
        self.plan = plan
        self.link = AgentLink(plan.socket_path, self.id)
        self.state = SandboxState.CREATING
        self.created_at = time.time()
        self.expires_at: float | None = None  # while running; see `move`
        self.remaining: float | None = None  # lifetime left, while paused or hibernated
        self.suspending = False  # hibernating: the runtime's exit is expected
        self.forgetting: asyncio.Task[None] | None = None  # the runtime's cleanup after it
        self.settling = False  # the reaper is applying its lifetime or idle action
        self.last_active = time.monotonic()  # last use through the engine (see `touch`)
        self.holds = 0  # streams attached now (`Engine.active`): never idle meanwhile
        self.ended_at: float | None = None
        self.end_reason: EndReason | None = None
        self.end_detail: str | None = None
        self.history: list[StateChange] = [StateChange(SandboxState.CREATING, self.created_at)]
        self.launch: Launch | None = None
        self.exit_status: int | None = None
        self.exited = asyncio.Event()
        self.ending = False
        self.lock = asyncio.Lock()
        self.pooled = False  # idle in a warm pool: invisible until claimed
        self.timings: dict[str, float] = {}  # seconds per stage of its start
        # Told of every state change, after it is saved (the engine's `on_change`).
        self.on_change: Callable[[Sandbox], None] | None = None

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Sandbox:
        """The sandbox a previous engine saved as `record` (see `record`), without its launch.

        Raises KeyError, TypeError or ValueError (among others) for a record that does not
        parse; the caller decides what to do with it.
        """
        sandbox = cls(SandboxSpec.from_dict(record["spec"]), SandboxPlan.from_dict(record["plan"]))
        if record["id"] != sandbox.id:
            raise ValueError(f"record of {record['id']!r} holds the plan of {sandbox.id!r}")
        sandbox.state = SandboxState(record["state"])
        sandbox.created_at = float(record["created_at"])
        sandbox.expires_at = _float_or_none(record.get("expires_at"))
        sandbox.remaining = _float_or_none(record.get("remaining"))
        sandbox.ended_at = _float_or_none(record.get("ended_at"))
        if record.get("end_reason") is not None:
            sandbox.end_reason = EndReason(record["end_reason"])
        sandbox.end_detail = record.get("end_detail")
        sandbox.pooled = bool(record.get("pooled", False))
        sandbox.history = [
            StateChange(SandboxState(state), float(at), reason)
            for state, at, reason in record["history"]
        ]
        return sandbox

    @property
    def runtime(self) -> str:
        return self.plan.runtime

    @property
    def alive(self) -> bool:
        return self.state is not SandboxState.TERMINATED

    def move(self, target: SandboxState, reason: str | None = None) -> None:
        """Change state, refusing illegal transitions; record it in the history.

        The lifetime counts only while running: leaving `running` keeps what is left of it in
        `remaining`, coming back sets a deadline that far ahead.
        """
        check_transition(self.id, self.state, target)
        now = time.time()
        if self.state is SandboxState.RUNNING and self.expires_at is not None:
            if target in (SandboxState.PAUSED, SandboxState.HIBERNATED):
                self.remaining, self.expires_at = max(0.0, self.expires_at - now), None
        elif target is SandboxState.RUNNING and self.remaining is not None:
            self.expires_at, self.remaining = now + self.remaining, None
        self.state = target
        self.history.append(StateChange(target, now, reason))
        if target is SandboxState.TERMINATED:
            self.ended_at = now
            self.expires_at = self.remaining = None
        self.save()
        if self.on_change is not None:
            self.on_change(self)

    def touch(self) -> None:
        """Record a use: the idle timeout starts again."""
        self.last_active = time.monotonic()

    def idle_deadline(self) -> float | None:
        """When (wall-clock) the sandbox becomes idle, if it can: running, an idle_timeout,
        not keep_alive, no stream attached."""
        spec = self.spec
        if (
            self.state is not SandboxState.RUNNING
            or spec.idle_timeout is None
            or spec.keep_alive
            or self.holds
        ):
            return None
        return time.time() + spec.idle_timeout - (time.monotonic() - self.last_active)

    def require(self, action: str, *allowed: SandboxState) -> None:
        require_state(self.id, action, self.state, *allowed)

    def end(self, reason: EndReason, detail: str | None = None) -> None:
        self.end_reason = reason
        self.end_detail = detail
        self.move(SandboxState.TERMINATED, reason.value)

    def info(self) -> SandboxInfo:
        return SandboxInfo(
            id=self.id,
            state=self.state,
            runtime=self.runtime,
            spec=self.spec,
            created_at=self.created_at,
            expires_at=self.expires_at,
            timeout_remaining=self.remaining,
            ended_at=self.ended_at,
            end_reason=self.end_reason,
            end_detail=self.end_detail,
            history=tuple(self.history),
        )

    def record(self) -> dict[str, Any]:
        """What a restarted engine needs to find this sandbox again."""
        return {
            "id": self.id,
            "spec": self.spec.to_dict(),
            "plan": self.plan.to_dict(),
            "state": self.state.value,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "remaining": self.remaining,
            "ended_at": self.ended_at,
            "end_reason": self.end_reason.value if self.end_reason else None,
            "end_detail": self.end_detail,
            "pid": self.launch.pid if self.launch else None,
            "pid_start_time": self.launch.start_time if self.launch else None,
            "pooled": self.pooled,
            "history": [[h.state.value, h.at, h.reason] for h in self.history],
        }

    def save(self) -> None:
        """Write `record()` atomically into the sandbox's directory (while it has one)."""
        directory = self.plan.dir
        if not directory.is_dir():
            return
        path = directory / RECORD_NAME
        temp = f"{path}.tmp"
        # Owner-only: the spec's environment may hold the user's secrets.
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(self.record()))
        os.replace(temp, path)


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)
