"""What the audit log holds (`GET /v1/audit`, `corral audit`) and what a replay reports
(`corral audit replay`); the server writes them (`corral.server.audit`), the SDK reads them.

An entry is one API action: who (the key, the client's address, the request), what (the
operation, the sandbox, and for commands, code and files what ran or which path), and how it
went (the HTTP status or the command's exit code, an error's code, the bytes in and out, how
long it took). Commands and code also keep a digest of their output, so a replay can tell
whether it came out the same; environment values, stdin, file contents and outputs themselves
are never kept.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# The operations a replay re-runs, and those it reports but cannot (their input is not kept).
REPLAYED = ("exec", "code")
FILE_CHANGES = ("files.write", "files.remove", "files.rename", "files.mkdir", "files.chmod")


@dataclass(frozen=True)
class AuditEntry:
    """One API action, as the audit log recorded it."""

    id: int
    at: float  # when it started (unix seconds)
    key_id: str | None  # None: the request never proved a key (a failed login)
    client: str  # the client's address
    request_id: str | None
    operation: str  # "exec", "code", "files.write"...; else "METHOD /route/{template}"
    sandbox_id: str | None
    status: int | None  # the HTTP status (None for a command or code: see exit_code)
    exit_code: int | None
    error: str | None  # the error's machine-readable code
    bytes_in: int
    bytes_out: int
    duration: float  # seconds
    detail: dict[str, Any] = field(default_factory=dict)  # argv, path, code, output digests...

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuditEntry:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class ReplayStep:
    """One recorded action and what replaying it gave: `result` is `same`, `different`,
    `failed` (it could not run now) or `skipped` (what it needs was never recorded)."""

    entry_id: int
    operation: str
    detail: dict[str, Any]  # what ran: argv or cmd, code and language, or the path
    result: str
    differences: list[str] = field(default_factory=list)  # the fields that came out otherwise
    recorded: dict[str, Any] = field(default_factory=dict)  # the recorded outcome
    replayed: dict[str, Any] = field(default_factory=dict)  # the outcome now, with an excerpt
    reason: str | None = None  # why skipped or failed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReplayStep:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class ReplayReport:
    """A replay of a sandbox's recorded commands and code in a fork of a snapshot."""

    sandbox_id: str  # the sandbox whose actions were replayed
    snapshot: str
    fork_id: str  # the sandbox they ran in (ended unless kept)
    steps: list[ReplayStep]

    @property
    def differences(self) -> list[ReplayStep]:
        """The steps that did not come out as recorded."""
        return [step for step in self.steps if step.result in ("different", "failed")]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "steps": [step.to_dict() for step in self.steps]}
