"""Plain result types the engine returns: sandbox info, command results, file and process info."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from corral.core.spec import SandboxSpec
from corral.core.state import EndReason, SandboxState


@dataclass(frozen=True)
class StateChange:
    """One entry of a sandbox's history."""

    state: SandboxState
    at: float  # Unix time
    reason: str | None = None


@dataclass(frozen=True)
class SandboxInfo:
    """A snapshot of what the engine knows about one sandbox."""

    id: str
    state: SandboxState
    runtime: str
    spec: SandboxSpec
    created_at: float
    expires_at: float | None
    ended_at: float | None = None
    end_reason: EndReason | None = None
    end_detail: str | None = None
    history: tuple[StateChange, ...] = ()
    timeout_remaining: float | None = None  # seconds of lifetime left while paused/hibernated
    node: str | None = None  # the machine whose engine runs it (`corral nodes list`)

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.spec.metadata)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SandboxInfo:
        """A `SandboxInfo` from its JSON (`to_dict`, or the server's answer)."""
        return cls(
            id=data["id"],
            state=SandboxState(data["state"]),
            runtime=data["runtime"],
            spec=SandboxSpec.from_dict(data["spec"]),
            created_at=data["created_at"],
            expires_at=data.get("expires_at"),
            timeout_remaining=data.get("timeout_remaining"),
            ended_at=data.get("ended_at"),
            end_reason=EndReason(data["end_reason"]) if data.get("end_reason") else None,
            end_detail=data.get("end_detail"),
            node=data.get("node"),
            history=tuple(
                StateChange(SandboxState(h["state"]), h["at"], h.get("reason"))
                for h in data.get("history", ())
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return {
            "id": self.id,
            "state": self.state.value,
            "runtime": self.runtime,
            "spec": self.spec.to_dict(),
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "timeout_remaining": self.timeout_remaining,
            "ended_at": self.ended_at,
            "end_reason": self.end_reason.value if self.end_reason else None,
            "end_detail": self.end_detail,
            "node": self.node,
            "history": [
                {"state": h.state.value, "at": h.at, "reason": h.reason} for h in self.history
            ],
        }


@dataclass(frozen=True)
class ExecResult:
    """How a command ended, with the output nobody streamed elsewhere."""

    exit_code: int | None
    stdout: bytes = b""
    stderr: bytes = b""
    signal: int | None = None
    timed_out: bool = False
    oom_killed: bool = False
    pid: int | None = None
    id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def text(self, stream: str = "stdout") -> str:
        data = self.stdout if stream == "stdout" else self.stderr
        return data.decode(errors="replace")


@dataclass(frozen=True)
class FileInfo:
    """A file, directory or symlink inside a sandbox."""

    name: str
    path: str
    type: str  # "file", "dir", "symlink" or "other"
    size: int
    mode: int
    mtime: float
    uid: int
    gid: int
    target: str | None = None  # where a symlink points

    @classmethod
    def from_guest(cls, data: dict[str, Any]) -> FileInfo:
        return cls(
            name=data["name"],
            path=data["path"],
            type=data["type"],
            size=data["size"],
            mode=data["mode"],
            mtime=data["mtime"],
            uid=data["uid"],
            gid=data["gid"],
            target=data.get("target"),
        )


@dataclass(frozen=True)
class ProcessInfo:
    """A process the guest agent started (running, or recently ended)."""

    id: int
    pid: int
    argv: tuple[str, ...]
    tag: str
    running: bool
    exit_code: int | None = None

    @classmethod
    def from_guest(cls, data: dict[str, Any]) -> ProcessInfo:
        return cls(
            id=data["id"],
            pid=data["pid"],
            argv=tuple(data["argv"]),
            tag=data.get("tag", ""),
            running=data["running"],
            exit_code=data.get("exit_code"),
        )


@dataclass(frozen=True)
class BuildEvent:
    """Progress of a build: a step starting (`kind="step"`) or a line of its output ("log").

    Step 0 is the base; `cached` says a step was found built and did not run.
    """

    kind: str
    step: int
    steps: int | None = None
    description: str | None = None
    cached: bool | None = None
    line: str | None = None

    def __str__(self) -> str:
        if self.kind == "log":
            return f"  {self.line}"
        suffix = " (cached)" if self.cached else ""
        return f"[{self.step}/{self.steps}] {self.description}{suffix}"


@dataclass(frozen=True)
class BuiltImage:
    """An image built on the server; give it (or its `id`, or its `name`) to `create`."""

    id: str
    name: str | None
    created_at: float
    size_bytes: int
    layers: int
    steps: tuple[str, ...]
    env: tuple[str, ...]  # names of the variables it sets
    workdir: str | None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuiltImage:
        return cls(
            id=data["id"],
            name=data.get("name"),
            created_at=data["created_at"],
            size_bytes=data["size_bytes"],
            layers=data["layers"],
            steps=tuple(data["steps"]),
            env=tuple(data["env"]),
            workdir=data.get("workdir"),
        )


@dataclass(frozen=True)
class SnapshotInfo:
    """A memory and filesystem snapshot of a gvisor sandbox; `Sandbox.create(snapshot=...)`
    starts new sandboxes from it, each exactly where the source was."""

    id: str
    sandbox_id: str  # the sandbox it was taken of
    runtime: str
    image: str
    created_at: float
    expires_at: float | None  # ttl; None: kept until deleted
    size_bytes: int
    name: str | None = None
    owner: str | None = None  # the service's key id; None for engine users

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VolumeInfo:
    """A volume as the engine knows it: size, use, and the live sandboxes mounting it."""

    id: str
    size_mb: int
    created_at: float
    # Bytes its files take: measured live while it is mounted, else as of its last unmount.
    used_bytes: int
    sandboxes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "size_mb": self.size_mb,
            "created_at": self.created_at,
            "used_bytes": self.used_bytes,
            "sandboxes": list(self.sandboxes),
        }


@dataclass(frozen=True)
class UsageSample:
    """A sandbox's use at one moment (`sandbox.metrics()`): counters are totals since it
    started, `cpu_percent` is of one core since the previous sample."""

    at: float
    cpu_seconds: float
    cpu_percent: float
    memory_bytes: int
    processes: int
    disk_bytes: int
    net_rx_bytes: int  # received by the sandbox (internet sandboxes; 0 otherwise)
    net_tx_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UsageSample:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class NodeInfo:
    """One machine whose engine runs sandboxes: what it offers, what its live sandboxes ask
    of it, and how busy it is (`Client.nodes()`, `corral nodes list`)."""

    name: str
    state: str  # "ready"; in a cluster also "draining", "lost" or "unreachable"
    runtimes: tuple[str, ...]  # those that can run there, strongest first
    sandboxes: int  # live ones, idle pooled ones included
    max_sandboxes: int
    capacity: Mapping[str, float]  # cpu, memory_mb, disk_mb: the machine times the overcommit
    allocated: Mapping[str, float]  # the same, as its live sandboxes ask for them
    load: float  # the 1-minute load average per CPU
    memory_available_mb: int
    pools: tuple[Mapping[str, Any], ...] = ()  # name, runtime, image, size, idle
    scope: int | None = None  # its engine's host scope (`corral serve --host-scope`)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NodeInfo:
        values = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        values["runtimes"] = tuple(values.get("runtimes", ()))
        values["pools"] = tuple(values.get("pools", ()))
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "runtimes": list(self.runtimes),
            "capacity": dict(self.capacity),
            "allocated": dict(self.allocated),
            "pools": [dict(pool) for pool in self.pools],
        }
