"""The engine's record of one sandbox: its spec, plan, phase, history and agent link.

A sandbox's life is an explicit state machine, and `SandboxRecord.move` is the only way to
change where a sandbox is in it. The engine works in *phases*, which add to the public states
(`corral.core.state`) the moments a caller never sees:

    warming ──> pooled ──> running            (started for a warm pool, idle, then claimed)
    creating ──> running ⇄ paused
                 running ──> hibernating ──> hibernated ──> running
                 (any alive phase) ──> ending ──> terminated

`warming`, `pooled`, `hibernating` and `ending` show as the public state before them (a
sandbox in a pool is nobody's and shows nowhere); only public changes enter the history and
are told to `on_change`. Each change is saved to the sandbox's directory (`sandbox.json`),
from which a restarted engine adopts the sandbox (`SandboxRecord.from_saved`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import time
from collections.abc import Callable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

from corral.agent import protocol
from corral.core.errors import InvalidRequest, InvalidState
from corral.core.models import SandboxInfo, StateChange
from corral.core.spec import MAX_TIMEOUT, SandboxSpec
from corral.core.state import EndReason, SandboxState, require_state
from corral.engine.agentlink import AgentLink
from corral.engine.sealing import KeyRing, open_secret, open_spec, seal_secret, seal_spec
from corral.runtimes import Launch
from corral.runtimes.plan import SandboxPlan

RECORD_NAME = "sandbox.json"
TEMP_NAME = f"{RECORD_NAME}.tmp"  # the next record, while it is written


class Phase(StrEnum):
    """Where the engine has a sandbox: the public states, and three it keeps to itself."""

    CREATING = "creating"
    WARMING = "warming"  # being started for a warm pool
    POOLED = "pooled"  # started and idle in a warm pool; nobody's until claimed
    RUNNING = "running"
    PAUSED = "paused"
    HIBERNATING = "hibernating"  # being checkpointed: its runtime's exit is expected
    HIBERNATED = "hibernated"
    ENDING = "ending"  # being torn down
    TERMINATED = "terminated"


_ALIVE_EXITS = frozenset({Phase.ENDING, Phase.TERMINATED})
_ALLOWED: dict[Phase, frozenset[Phase]] = {
    Phase.CREATING: frozenset({Phase.RUNNING}) | _ALIVE_EXITS,
    Phase.WARMING: frozenset({Phase.POOLED}) | _ALIVE_EXITS,
    Phase.POOLED: frozenset({Phase.RUNNING}) | _ALIVE_EXITS,
    Phase.RUNNING: frozenset({Phase.PAUSED, Phase.HIBERNATING}) | _ALIVE_EXITS,
    Phase.PAUSED: frozenset({Phase.RUNNING}) | _ALIVE_EXITS,
    Phase.HIBERNATING: frozenset({Phase.HIBERNATED, Phase.RUNNING}) | _ALIVE_EXITS,
    Phase.HIBERNATED: frozenset({Phase.RUNNING}) | _ALIVE_EXITS,
    Phase.ENDING: frozenset({Phase.TERMINATED}),
    Phase.TERMINATED: frozenset(),
}
# The public state each phase shows; None: the state before it.
_PUBLIC: dict[Phase, SandboxState | None] = {
    Phase.CREATING: SandboxState.CREATING,
    Phase.WARMING: None,
    Phase.POOLED: None,
    Phase.RUNNING: SandboxState.RUNNING,
    Phase.PAUSED: SandboxState.PAUSED,
    Phase.HIBERNATING: None,
    Phase.HIBERNATED: SandboxState.HIBERNATED,
    Phase.ENDING: None,
    Phase.TERMINATED: SandboxState.TERMINATED,
}


class SandboxRecord:
    """One sandbox owned by the engine: what it is, where it is in its life, its link."""

    def __init__(
        self,
        spec: SandboxSpec,
        plan: SandboxPlan,
        *,
        for_pool: bool = False,
        secret: bytes | None,
        keys: KeyRing,
    ) -> None:
        """A sandbox's record; `secret` is its agent's (see `corral.agent.protocol`): a new
        one for a new sandbox, the snapshot's for one restored from it, None for an agent from
        before agents proved themselves. `keys` seal the secrets in what `save` writes."""
        self.id = plan.sandbox_id
        self.keys = keys
        self.spec = spec
        self.plan = plan
        self.link = AgentLink(plan.socket_dir, self.id, secret)
        self.phase = Phase.WARMING if for_pool else Phase.CREATING
        self.claimed = not for_pool  # has had a public life (see `pooled`)
        self.state = SandboxState.CREATING  # the public state: see `move`
        self.created_at = time.time()
        self.expires_at: float | None = None  # while running; see `move`
        self.remaining: float | None = None  # lifetime left, while paused or hibernated
        self.last_active = time.monotonic()  # last use through the engine (see `touch`)
        self.holds = 0  # streams attached now (`Engine.active`): never idle meanwhile
        self.ended_at: float | None = None
        self.end_reason: EndReason | None = None
        self.end_detail: str | None = None
        self.node: str | None = None  # set by the registry that holds it
        self.leaving: str | None = None  # the node it is moving to (see `corral.engine.moving`)
        self.history: list[StateChange] = [StateChange(SandboxState.CREATING, self.created_at)]
        self.launch: Launch | None = None
        self.exit_status: int | None = None
        self.exited = asyncio.Event()  # its runtime's main process has exited
        self.lock = asyncio.Lock()  # held by whatever changes the running sandbox
        self.timings: dict[str, float] = {}  # seconds per stage of its start
        self._plan_saved: dict[str, Any] | None = None  # see `to_saved`
        self._secret_sealed: tuple[bytes | None, str | None] | None = None
        # Told of every public state change, after it is saved (the engine's `on_change`).
        self.on_change: Callable[[SandboxRecord], None] | None = None

    @classmethod
    def from_saved(cls, saved: Mapping[str, Any], keys: KeyRing) -> SandboxRecord:
        """The sandbox a previous engine saved as `saved` (see `to_saved`), without its launch.

        Raises KeyError, TypeError or ValueError (among others) for a record that does not
        parse; the caller decides what to do with it.
        """
        # Records of engines whose agents did not prove themselves have no secret.
        secret = open_secret(keys, saved.get("agent_secret"))
        spec, plan = open_spec(keys, saved["spec"]), SandboxPlan.from_dict(saved["plan"])
        record = cls(spec, plan, secret=secret, keys=keys)
        if saved["id"] != record.id:
            raise ValueError(f"record of {saved['id']!r} holds the plan of {record.id!r}")
        record.state = SandboxState(saved["state"])
        # Records of engines before phases existed say `pooled`; their pooled ones ran. A
        # checkpoint or an ending that a crash cut short is undone: the public state holds.
        public = Phase(record.state.value)
        legacy = Phase.POOLED if saved.get("pooled") else public
        record.phase = Phase(saved.get("phase", legacy))
        if record.phase in (Phase.HIBERNATING, Phase.ENDING):
            record.phase = public
        # Nobody's to its end (a pool's, or a boot image's template), whatever phase it got to.
        record.claimed = not saved.get("pooled", False)
        record.created_at = float(saved["created_at"])
        record.expires_at = _float_or_none(saved.get("expires_at"))
        record.remaining = _float_or_none(saved.get("remaining"))
        record.ended_at = _float_or_none(saved.get("ended_at"))
        if saved.get("end_reason") is not None:
            record.end_reason = EndReason(saved["end_reason"])
        record.end_detail = saved.get("end_detail")
        record.history = [
            StateChange(SandboxState(state), float(at), reason)
            for state, at, reason in saved["history"]
        ]
        return record

    @property
    def runtime(self) -> str:
        return self.plan.runtime

    @property
    def alive(self) -> bool:
        return self.phase is not Phase.TERMINATED

    @property
    def pooled(self) -> bool:
        """Whether it is nobody's and shown nowhere: started for a warm pool or as a boot
        image (see `corral.engine.boots`), and never claimed, up to its end."""
        return not self.claimed or self.phase in (Phase.WARMING, Phase.POOLED)

    @property
    def ending(self) -> bool:
        return self.phase is Phase.ENDING

    @property
    def gone(self) -> bool:
        """Ended, or on its way out: nothing more is started in it."""
        return not self.alive or self.ending

    def move(self, target: Phase, reason: str | None = None) -> None:
        """Change phase, refusing illegal transitions; a public change enters the history.

        The lifetime counts only while running: leaving `running` keeps what is left of it in
        `remaining`, coming back sets a deadline that far ahead.
        """
        if target not in _ALLOWED[self.phase]:
            raise InvalidState(f"cannot move sandbox {self.id} from {self.phase} to {target}")
        self.phase = target
        public = _PUBLIC[target]
        if public is None or public is self.state:
            self.save()  # a pooled sandbox is recorded as such, for the next engine
            return
        now = time.time()
        if self.state is SandboxState.RUNNING and self.expires_at is not None:
            self.remaining, self.expires_at = max(0.0, self.expires_at - now), None
        elif public is SandboxState.RUNNING and self.remaining is not None:
            self.expires_at, self.remaining = now + self.remaining, None
        self.state = public
        self.history.append(StateChange(public, now, reason))
        if public is SandboxState.TERMINATED:
            self.ended_at = now
            self.expires_at = self.remaining = None
        self.save()
        if self.on_change is not None:
            self.on_change(self)

    def start_lifetime(self, spec: SandboxSpec) -> None:
        """Begin the life a user asked for: `spec`, a fresh history and a deadline. For a
        sandbox claimed from a pool, this is where its public life starts."""
        now = time.time()
        self.claimed = True
        if self.phase is Phase.POOLED:
            self.spec = spec
            self.created_at = now
            self.history = [StateChange(SandboxState.CREATING, now)]
            self.touch()  # its idle time starts now, not when the pool started it
        self.expires_at = now + spec.timeout
        self.move(Phase.RUNNING)

    def set_timeout(self, seconds: float) -> SandboxInfo:
        """A new lifetime of `seconds` from now (counted only while it runs); saved."""
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, int | float)
            or not 1 <= seconds <= MAX_TIMEOUT
        ):
            raise InvalidRequest(
                f"timeout must be 1 to {MAX_TIMEOUT:g} seconds (24 h), got {seconds!r}"
            )
        self.require(
            "set the timeout of", SandboxState.RUNNING, SandboxState.PAUSED, SandboxState.HIBERNATED
        )
        if self.state is SandboxState.RUNNING:
            self.expires_at = time.time() + float(seconds)
        else:  # the lifetime counts only while running
            self.remaining = float(seconds)
        self.save()
        return self.info()

    def end(self, reason: EndReason, detail: str | None = None) -> None:
        self.end_reason = reason
        self.end_detail = detail
        self.move(Phase.TERMINATED, reason.value)

    def touch(self) -> None:
        """Record a use: the idle timeout starts again."""
        self.last_active = time.monotonic()

    def idle_deadline(self) -> float | None:
        """When (wall-clock) the sandbox becomes idle, if it can: running, an idle_timeout,
        not keep_alive, no stream attached."""
        spec = self.spec
        if (
            self.phase is not Phase.RUNNING
            or spec.idle_timeout is None
            or spec.keep_alive
            or self.holds
        ):
            return None
        return time.time() + spec.idle_timeout - (time.monotonic() - self.last_active)

    def require(self, action: str, *allowed: SandboxState) -> None:
        """Refuse `action` unless the sandbox is in one of `allowed` and not on its way out."""
        if self.phase is Phase.ENDING:
            raise InvalidState(f"cannot {action} sandbox {self.id}: it is ending")
        self.require_staying(action)
        require_state(self.id, action, self.state, *allowed)

    def require_staying(self, action: str) -> None:
        """Refuse `action` while the sandbox moves to another node: it is not here to change."""
        if self.leaving is not None:
            raise InvalidState(
                f"cannot {action} sandbox {self.id}: it is moving to node {self.leaving}; retry "
                "in a few seconds",
                code="sandbox_moving",
            )

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
            node=self.node,
        )

    def to_saved(self) -> dict[str, Any]:
        """What a restarted engine needs to find this sandbox again."""
        return {
            "id": self.id,
            "spec": seal_spec(self.keys, self.spec),
            "plan": self._saved_plan(),
            "state": self.state.value,
            "phase": self.phase.value,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "remaining": self.remaining,
            "ended_at": self.ended_at,
            "end_reason": self.end_reason.value if self.end_reason else None,
            "end_detail": self.end_detail,
            "pid": self.launch.pid if self.launch else None,
            "pid_start_time": self.launch.start_time if self.launch else None,
            "pooled": self.pooled,
            # Owner-only, like the whole record (see `save`), and sealed.
            "agent_secret": self._sealed_secret(),
            "history": [[h.state.value, h.at, h.reason] for h in self.history],
        }

    def _saved_plan(self) -> dict[str, Any]:
        if self._plan_saved is None:  # the plan never changes; its dict is made once
            self._plan_saved = self.plan.to_dict()
        return self._plan_saved

    def _sealed_secret(self) -> str | None:
        # Sealed anew only when the secret changes (a restore gives the snapshot's).
        secret = self.link.secret
        if self._secret_sealed is None or self._secret_sealed[0] != secret:
            self._secret_sealed = (secret, seal_secret(self.keys, secret))
        return self._secret_sealed[1]

    def save(self) -> None:
        """Write `to_saved()` into the sandbox's directory (while it has one), whole: the next
        record beside the old one, complete before the old one goes, then renamed to its place
        (`read_saved`).

        Not `os.replace` over the old record: ext4 then forces the new file's blocks to be
        allocated at once (`auto_da_alloc`), 150 µs of each save here. And a pooled sandbox
        has its next record's file made while it is idle: its next save is its claim's, on
        the path of a create (docs/performance.md)."""
        directory = self.plan.dir
        temp = directory / TEMP_NAME
        text = json.dumps(self.to_saved()).encode()
        try:
            fd = _open_next(temp)
        except FileNotFoundError:  # no directory (any more): nothing to keep a record for
            return
        try:
            if os.fstat(fd).st_size:  # a save stopped half-way left it
                os.ftruncate(fd, 0)
            view = memoryview(text)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        path = directory / RECORD_NAME
        path.unlink(missing_ok=True)
        os.rename(temp, path)
        if self.phase is Phase.POOLED:  # made now, for the claim; without it, made then
            with contextlib.suppress(OSError):
                os.close(_open_next(temp))


def _open_next(temp: Path) -> int:
    """The next record's file, made if missing (not emptied: `save` does, where it must).
    Owner-only: the spec's environment may hold the user's secrets, and it holds the agent's."""
    return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)


def read_saved(directory: Path) -> dict[str, Any]:
    """The record `SandboxRecord.save` left in `directory`: `sandbox.json`, or, where an engine
    stopped between removing it and renaming the new one, the new one (complete by then).
    Raises OSError (FileNotFoundError: neither) or ValueError (not a record)."""
    try:
        text = (directory / RECORD_NAME).read_text()
    except FileNotFoundError:
        text = (directory / TEMP_NAME).read_text()
        if not text:  # made for a pooled sandbox's next save, and nothing more
            raise FileNotFoundError(f"no record in {directory}") from None
    saved = json.loads(text)
    if not isinstance(saved, dict):
        raise ValueError("not a JSON object")
    return saved


def settle_saved(directory: Path) -> None:
    """Put the record `read_saved` found under the temporary name (an engine stopped between
    a save's removing the old record and its rename) in its place: the next save writes into
    the temporary name, and a stop in the middle of it would leave no record at all."""
    if not (directory / RECORD_NAME).exists():
        os.rename(directory / TEMP_NAME, directory / RECORD_NAME)


def new_secret() -> bytes:
    """A fresh secret for a new sandbox's agent."""
    return secrets.token_bytes(protocol.SECRET_BYTES)


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)
