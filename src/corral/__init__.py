"""Corral: self-hosted secure sandboxes for AI agents.

`import corral` is the SDK: it loads no server, engine, runtime or host code, and works on a
machine without bubblewrap or runsc. `corral.Engine`, the server's in-process API, is loaded on
first use.

Example:
    >>> import corral
    >>> with corral.Sandbox.create() as sandbox:     # CORRAL_URL, CORRAL_API_KEY
    ...     print(sandbox.run("python3 -c 'print(6*7)'").stdout)
    42
"""

import typing as _typing

from corral.client import (
    AsyncClient,
    AsyncDeployment,
    AsyncFiles,
    AsyncPreview,
    AsyncProcess,
    AsyncSandbox,
    AsyncVolume,
    Client,
    CommandResult,
    Deployment,
    Files,
    Image,
    Network,
    Preview,
    Process,
    ProcessExit,
    Sandbox,
    Volume,
)
from corral.core.audit import AuditEntry, ReplayReport, ReplayStep
from corral.core.code import CodeContext, Execution, ExecutionError, Logs, Result
from corral.core.errors import (
    AgentUnavailable,
    AuthError,
    CheckpointFailed,
    CommandTimeout,
    Conflict,
    ConnectionFailed,
    ContextNotFound,
    CorralError,
    DeploymentFailed,
    FileExists,
    FileNotFound,
    ImageBuildFailed,
    ImageNotFound,
    InvalidPath,
    InvalidRequest,
    InvalidState,
    LimitReached,
    NoSpace,
    NotFound,
    PathBusy,
    PayloadTooLarge,
    PermissionDenied,
    RuntimeUnavailable,
    SandboxEnded,
    SandboxFailed,
    SandboxNotFound,
    ServiceUnavailable,
    UnsupportedLanguage,
    VolumeInUse,
    VolumeNotFound,
)
from corral.core.models import (
    BuildEvent,
    BuiltImage,
    FileInfo,
    NodeInfo,
    ProcessInfo,
    SandboxInfo,
    SnapshotInfo,
    UsageSample,
)
from corral.core.spec import SandboxSpec
from corral.core.state import EndReason, SandboxState

if _typing.TYPE_CHECKING:
    from corral.engine import Engine


def __getattr__(name: str) -> _typing.Any:
    if name == "Engine":
        from corral.engine import Engine  # noqa: PLC0415 - the SDK never needs it

        return Engine
    raise AttributeError(f"module 'corral' has no attribute {name!r}")


__all__ = [
    "AgentUnavailable",
    "AsyncClient",
    "AsyncDeployment",
    "AsyncFiles",
    "AsyncPreview",
    "AsyncProcess",
    "AsyncSandbox",
    "AsyncVolume",
    "AuditEntry",
    "AuthError",
    "BuildEvent",
    "BuiltImage",
    "CheckpointFailed",
    "Client",
    "CodeContext",
    "CommandResult",
    "CommandTimeout",
    "Conflict",
    "ConnectionFailed",
    "ContextNotFound",
    "CorralError",
    "Deployment",
    "DeploymentFailed",
    "EndReason",
    "Engine",
    "Execution",
    "ExecutionError",
    "FileExists",
    "FileInfo",
    "FileNotFound",
    "Files",
    "Image",
    "ImageBuildFailed",
    "ImageNotFound",
    "InvalidPath",
    "InvalidRequest",
    "InvalidState",
    "LimitReached",
    "Logs",
    "Network",
    "NoSpace",
    "NodeInfo",
    "NotFound",
    "PathBusy",
    "PayloadTooLarge",
    "PermissionDenied",
    "Preview",
    "Process",
    "ProcessExit",
    "ProcessInfo",
    "ReplayReport",
    "ReplayStep",
    "Result",
    "RuntimeUnavailable",
    "Sandbox",
    "SandboxEnded",
    "SandboxFailed",
    "SandboxInfo",
    "SandboxNotFound",
    "SandboxSpec",
    "SandboxState",
    "ServiceUnavailable",
    "SnapshotInfo",
    "UnsupportedLanguage",
    "UsageSample",
    "Volume",
    "VolumeInUse",
    "VolumeNotFound",
]
