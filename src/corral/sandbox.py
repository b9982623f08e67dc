"""The engine's record of one sandbox: its spec, plan, state, history and agent link.

State changes go through `Sandbox.move`, which asks `corral.state` whether they are legal, so
the state machine is enforced in exactly one place.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from corral.agentlink import AgentLink
from corral.models import SandboxInfo, StateChange
from corral.plan import SandboxPlan
from corral.runtimes import Launch
from corral.spec import SandboxSpec
from corral.state import EndReason, SandboxState, check_transition, require_state


class Sandbox:
    """One sandbox owned by the engine."""

    def __init__(self, spec: SandboxSpec, plan: SandboxPlan) -> None:
        self.id = plan.sandbox_id
        self.spec = spec
        self.plan = plan
        self.link = AgentLink(plan.socket_path, self.id)
        self.state = SandboxState.CREATING
        self.created_at = time.time()
        self.expires_at: float | None = None
        self.ended_at: float | None = None
        self.end_reason: EndReason | None = None
        self.end_detail: str | None = None
        self.history: list[StateChange] = [StateChange(SandboxState.CREATING, self.created_at)]
        self.launch: Launch | None = None
        self.exit_status: int | None = None
        self.exited = asyncio.Event()
        self.ending = False
        self.lock = asyncio.Lock()

    @property
    def runtime(self) -> str:
        return self.plan.runtime

    @property
    def alive(self) -> bool:
        return self.state is not SandboxState.TERMINATED

    def move(self, target: SandboxState, reason: str | None = None) -> None:
        """Change state, refusing illegal transitions; record it in the history."""
        check_transition(self.id, self.state, target)
        self.state = target
        now = time.time()
        self.history.append(StateChange(target, now, reason))
        if target is SandboxState.TERMINATED:
            self.ended_at = now
            self.expires_at = None
        self.save()

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
            "pid": self.launch.pid if self.launch else None,
            "history": [[h.state.value, h.at, h.reason] for h in self.history],
        }

    def save(self) -> None:
        """Write `record()` atomically into the sandbox's directory (while it has one)."""
        directory = self.plan.dir
        if not directory.is_dir():
            return
        path = directory / "sandbox.json"
        temp = f"{path}.tmp"
        # Owner-only: the spec's environment may hold the user's secrets.
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(self.record()))
        os.replace(temp, path)
