"""Corral: self-hosted secure sandboxes for AI agents.

Example:
    >>> import corral
    >>> with corral.Sandbox.create() as sandbox:     # CORRAL_URL, CORRAL_API_KEY
    ...     print(sandbox.run("python3 -c 'print(6*7)'").stdout)
    42
"""

from corral.client import (
    AsyncClient,
    AsyncFiles,
    AsyncProcess,
    AsyncSandbox,
    AsyncVolume,
    Client,
    CommandResult,
    Files,
    Process,
    ProcessExit,
    Sandbox,
    Volume,
)
from corral.engine import Engine
from corral.errors import (
    AgentUnavailable,
    AuthError,
    CommandTimeout,
    Conflict,
    ConnectionFailed,
    CorralError,
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
    PayloadTooLarge,
    PermissionDenied,
    RuntimeUnavailable,
    SandboxEnded,
    SandboxFailed,
    SandboxNotFound,
    ServiceUnavailable,
    VolumeInUse,
    VolumeNotFound,
)
from corral.image import Image
from corral.models import BuildEvent, BuiltImage, FileInfo, ProcessInfo, SandboxInfo
from corral.snapshots import SnapshotInfo
from corral.spec import SandboxSpec
from corral.state import EndReason, SandboxState

__all__ = [
    "AgentUnavailable",
    "AsyncClient",
    "AsyncFiles",
    "AsyncProcess",
    "AsyncSandbox",
    "AsyncVolume",
    "AuthError",
    "BuildEvent",
    "BuiltImage",
    "Client",
    "CommandResult",
    "CommandTimeout",
    "Conflict",
    "ConnectionFailed",
    "CorralError",
    "EndReason",
    "Engine",
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
    "NoSpace",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "Process",
    "ProcessExit",
    "ProcessInfo",
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
    "Volume",
    "VolumeInUse",
    "VolumeNotFound",
]
