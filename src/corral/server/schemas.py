"""The HTTP API's request and response bodies (pydantic), which also make its OpenAPI spec.

Requests forbid unknown fields, so a typo such as `memroy_mb` is a 400 naming the field rather
than a silently ignored setting.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from corral.core.models import ExecResult, FileInfo, ProcessInfo, SandboxInfo, SnapshotInfo
from corral.core.spec import FIELD
from corral.server.store import ApiKey


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VolumeMountBody(Request):
    """One volume in a sandbox's spec."""

    path: str = Field(description="absolute mount point inside the sandbox, such as /data")
    volume: str = Field(description="the volume's name or id (an id in answers)")
    read_only: bool = False


def _spec(name: str) -> Any:
    """The default and description of spec field `name`, from its one definition."""
    spec_field = FIELD[name]
    default = spec_field.default
    if isinstance(default, dict | tuple):  # a fresh one per request
        return Field(default_factory=type(default) if isinstance(default, dict) else list)
    return Field(default, description=spec_field.description)


class NetworkRulesBody(Request):
    """Egress rules: names, `*.` wildcards and IPv4 CIDRs (see docs/network.md)."""

    allow: list[str] | None = Field(None, description="only these (null: anywhere not denied)")
    deny: list[str] = Field(default_factory=list, description="never these")


class KeyNetworkOut(BaseModel):
    key_id: str
    egress: dict[str, Any] | None = Field(description="{allow, deny}; null: none set")


class SpecBody(Request):
    """A sandbox's spec (`corral.core.spec.SPEC_FIELDS`). Omitted fields take the secure
    defaults; values are checked there, with messages that say what to send."""

    image: str = _spec("image")
    runtime: str | None = _spec("runtime")
    cpu: float = _spec("cpu")
    memory_mb: int = _spec("memory_mb")
    disk_mb: int = _spec("disk_mb")
    max_processes: int = _spec("max_processes")
    timeout: float = _spec("timeout")
    network: Literal["none", "internet"] = _spec("network")
    egress: NetworkRulesBody | None = _spec("egress")
    env: dict[str, str] = _spec("env")
    workdir: str | None = _spec("workdir")
    auto_resume: StrictBool = _spec("auto_resume")
    idle_timeout: float | None = _spec("idle_timeout")
    on_idle: Literal["pause", "hibernate", "terminate"] = _spec("on_idle")
    keep_alive: StrictBool = _spec("keep_alive")
    on_timeout: Literal["terminate", "hibernate"] = _spec("on_timeout")
    metadata: dict[str, str] = _spec("metadata")
    volumes: list[VolumeMountBody] = _spec("volumes")


class CreateSandbox(SpecBody):
    """POST /v1/sandboxes."""

    pool: bool = Field(True, description="take a matching warm sandbox if a pool has one")
    snapshot: str | None = Field(
        None, description="start from this snapshot (id or name): its image, runtime, resources"
    )


class TakeSnapshot(Request):
    name: str | None = Field(None, description="name it (unique among your snapshots)")
    ttl: float | None = Field(None, description="delete it this many seconds from now")


class Fork(Request):
    count: int = Field(description="how many copies (1 to 64)")


class SnapshotOut(BaseModel):
    id: str
    name: str | None
    sandbox_id: str
    runtime: str
    image: str
    created_at: float
    expires_at: float | None
    size_bytes: int

    @classmethod
    def of(cls, info: SnapshotInfo) -> SnapshotOut:
        fields = info.to_dict()
        fields.pop("owner")
        return cls(**fields)


class PoolBody(Request):
    """PUT /v1/pools/{name}: what the pool's sandboxes are started with (the spec's fields
    fixed at start), and how many."""

    image: str = _spec("image")
    runtime: str | None = _spec("runtime")
    cpu: float = _spec("cpu")
    memory_mb: int = _spec("memory_mb")
    disk_mb: int = _spec("disk_mb")
    max_processes: int = _spec("max_processes")
    network: Literal["none", "internet"] = _spec("network")
    size: int = Field(description="idle sandboxes to keep started")


class NodeResources(BaseModel):
    cpu: float
    memory_mb: float
    disk_mb: float


class NodePool(BaseModel):
    name: str
    runtime: str | None
    image: str
    size: int
    idle: int


class NodeOut(BaseModel):
    name: str
    state: str = Field(description="ready; in a cluster also draining, lost or unreachable")
    runtimes: list[str] = Field(description="those that can run there, strongest first")
    sandboxes: int = Field(description="live sandboxes, idle pooled ones included")
    max_sandboxes: int
    capacity: NodeResources = Field(description="the machine times the overcommit ratios")
    allocated: NodeResources = Field(description="what its live sandboxes ask for")
    load: float = Field(description="the 1-minute load average per CPU")
    memory_available_mb: int
    pools: list[NodePool]
    scope: int | None = Field(description="its engine's host scope (--host-scope)")


class PoolOut(BaseModel):
    name: str
    image: str
    runtime: str | None
    cpu: float
    memory_mb: int
    disk_mb: int
    max_processes: int
    network: str
    size: int
    idle: int
    hits: int
    misses: int
    failures: int
    last_error: str | None


class SetTimeout(Request):
    timeout: float = Field(description="seconds from now until the sandbox ends (at most 24 h)")


class Exec(Request):
    """A command: `cmd` runs through /bin/sh, `argv` runs directly."""

    cmd: str | None = None
    argv: list[str] | None = None
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    user: str | int | None = None
    timeout: float | None = Field(60.0, description="kill the command after this many seconds")
    tag: str | None = None


class RunCommand(Exec):
    """POST /v1/sandboxes/{id}/exec: run to completion, `stdin` fed as text."""

    stdin: str | None = None


class Pty(Request):
    rows: int = 24
    cols: int = 80


class StreamExec(Exec):
    """The first message on the exec WebSocket."""

    stdin: bool = False
    pty: Pty | None = None
    timeout: float | None = None


class Signal(Request):
    signal: str | int = "SIGTERM"


class MakeDir(Request):
    path: str
    parents: bool = True
    mode: int = 0o755


class Rename(Request):
    src: str
    dst: str
    overwrite: bool = False


class Chmod(Request):
    path: str
    mode: int


class CreateKey(Request):
    name: str
    admin: bool = False


class HistoryEntry(BaseModel):
    state: str
    at: float
    reason: str | None = None


class SandboxOut(BaseModel):
    id: str
    state: str
    runtime: str
    image: str
    created_at: float
    expires_at: float | None = Field(description="while running; the lifetime counts only then")
    timeout_remaining: float | None = Field(None, description="lifetime left, while not running")
    ended_at: float | None
    end_reason: str | None
    end_detail: str | None
    node: str | None = Field(None, description="the machine whose engine runs it")
    metadata: dict[str, str]
    spec: SpecBody
    history: list[HistoryEntry]

    @classmethod
    def of(cls, info: SandboxInfo) -> SandboxOut:
        spec = info.spec.to_dict()
        return cls(
            id=info.id,
            state=info.state.value,
            runtime=info.runtime,
            image=info.spec.image,
            created_at=info.created_at,
            expires_at=info.expires_at,
            timeout_remaining=info.timeout_remaining,
            ended_at=info.ended_at,
            end_reason=info.end_reason.value if info.end_reason else None,
            end_detail=info.end_detail,
            node=info.node,
            metadata=dict(info.spec.metadata),
            # The environment may hold secrets: it goes in, it never comes back out.
            spec=SpecBody(**{**spec, "env": {name: "" for name in spec["env"]}}),
            history=[
                HistoryEntry(state=h.state.value, at=h.at, reason=h.reason) for h in info.history
            ],
        )


class Move(Request):
    node: str | None = Field(None, description="the node to move it to; else the front picks")


class HandOff(Request):
    to: str = Field(description="the node it moves to")


class HandOffOut(BaseModel):
    snapshot: SnapshotOut = Field(description="its checkpoint, to copy to the other node")
    was: str = Field(description="its state before the hand-off")
    sandbox: SandboxOut


class TakeIn(Request):
    snapshot: str = Field(description="the hand-off's snapshot, copied to this node")
    timeout_remaining: float | None = Field(None, description="its lifetime left")
    wake: bool = Field(False, description="wake it once it is here (it was running)")


class OwnedSandboxOut(BaseModel):
    """A sandbox as an admin lists it: with the id of the key that owns it."""

    owner: str
    sandbox: SandboxOut


class CommandOut(BaseModel):
    exit_code: int | None
    stdout: str
    stderr: str
    signal: int | None = None
    timed_out: bool = False
    oom_killed: bool = False
    truncated: bool = Field(False, description="output past the limit was dropped")
    id: int | None = None

    @classmethod
    def of(cls, result: ExecResult, truncated: bool = False) -> CommandOut:
        return cls(
            exit_code=result.exit_code,
            stdout=result.stdout.decode(errors="replace"),
            stderr=result.stderr.decode(errors="replace"),
            signal=result.signal,
            timed_out=result.timed_out,
            oom_killed=result.oom_killed,
            truncated=truncated,
            id=result.id,
        )


class FileOut(BaseModel):
    name: str
    path: str
    type: str
    size: int
    mode: int
    mtime: float
    uid: int
    gid: int
    target: str | None = None

    @classmethod
    def of(cls, info: FileInfo) -> FileOut:
        return cls(**info.__dict__)


class Written(BaseModel):
    path: str
    bytes: int


class ProcessOut(BaseModel):
    id: int
    pid: int
    argv: list[str]
    tag: str
    running: bool
    exit_code: int | None = None

    @classmethod
    def of(cls, info: ProcessInfo) -> ProcessOut:
        return cls(**{**info.__dict__, "argv": list(info.argv)})


class KilledOut(BaseModel):
    killed: int  # how many processes there were, the agent's own not counted


class KeyOut(BaseModel):
    id: str
    name: str
    hint: str
    admin: bool
    created_at: float
    revoked_at: float | None
    secret: str | None = Field(None, description="the key itself: only in the create response")

    @classmethod
    def of(cls, key: ApiKey, secret: str | None = None) -> KeyOut:
        return cls(**key.to_dict(), secret=secret)


class QuotaBody(Request):
    """A key's limits; a field left out or null is no limit (see `corral.core.quota`)."""

    cpu: float | None = Field(None, ge=0, description="CPUs its live sandboxes may ask for")
    memory_mb: int | None = Field(None, ge=0, description="MiB of memory, likewise")
    disk_mb: int | None = Field(None, ge=0, description="MiB of disk, likewise")
    volume_mb: int | None = Field(None, ge=0, description="MiB of volumes")
    snapshot_bytes: int | None = Field(None, ge=0, description="bytes of snapshots")
    blob_bytes: int | None = Field(None, ge=0, description="bytes of uploaded content")


class QuotaOut(BaseModel):
    key_id: str
    quota: dict[str, float | int | None]
    usage: dict[str, float | int | None]


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorOut(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: str
    version: str
    runtimes: dict[str, str | None]


class BuildImage(Request):
    """POST /v1/images: a recipe (see `corral.Image.recipe`) and an optional name."""

    recipe: dict[str, Any] = Field(description="{'base': {...}, 'steps': [...]}")
    name: str | None = Field(None, description="name the image; moves from another image")


class ImageOut(BaseModel):
    id: str
    name: str | None
    created_at: float
    size_bytes: int = Field(description="its layers on disk, shared ones included")
    layers: int
    steps: list[str]
    env: list[str] = Field(description="names of the variables it sets")
    workdir: str | None


class ImageUsage(BaseModel):
    layers_bytes: int
    blobs_bytes: int


class Pruned(ImageUsage):
    removed_images: int
    removed_layers: int
    freed_bytes: int


class BlobOut(BaseModel):
    digest: str
    size: int


class SnapshotFilesystem(Request):
    name: str | None = Field(None, description="name the new image")


class CreateVolume(Request):
    """POST /v1/volumes."""

    name: str = Field(description="unique among your volumes: a-z, 0-9, '.', '_', '-'")
    size_mb: int = Field(1024, description="the volume's size, which is its quota (16 MiB-1 TiB)")


class VolumeOut(BaseModel):
    id: str
    name: str
    size_mb: int
    created_at: float
    used_bytes: int = Field(description="live while mounted, else as of its last unmount")
    sandboxes: list[str] = Field(description="your live sandboxes that mount it")
