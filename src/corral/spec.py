"""What a user asks for when creating a sandbox: `SandboxSpec`, validated once, then immutable.

Every limit has a secure default (no network, 1 CPU, 512 MiB, a 300 s lifetime) and a hard
ceiling, so a typo never turns into a sandbox that can take the host down.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Literal

from corral.errors import InvalidPath, InvalidRequest

NetworkPolicy = Literal["none", "internet"]
NETWORK_POLICIES: tuple[NetworkPolicy, ...] = ("none", "internet")
IdleAction = Literal["pause", "hibernate", "terminate"]
IDLE_ACTIONS: tuple[IdleAction, ...] = ("pause", "hibernate", "terminate")
TimeoutAction = Literal["terminate", "hibernate"]
TIMEOUT_ACTIONS: tuple[TimeoutAction, ...] = ("terminate", "hibernate")

DEFAULT_TIMEOUT = 300.0
MAX_TIMEOUT = 24 * 3600.0

# (minimum, maximum) of each limit; the maxima stop absurd requests, not big ones.
CPU_RANGE = (0.05, 256.0)
MEMORY_MB_RANGE = (32, 1024 * 1024)
DISK_MB_RANGE = (16, 4 * 1024 * 1024)
PROCESSES_RANGE = (8, 1 << 20)

MAX_VOLUMES = 16  # per sandbox
# Where a volume may not be mounted: the kernel's and the runtime's own filesystems, and the
# directory of the guest agent and its socket. A volume on, above or below one of these would
# hide it (or be hidden by it), so the sandbox would not start or would not behave.
RESERVED_PATHS = (
    "/proc",
    "/sys",
    "/dev",
    "/run/corral",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/ssl/certs/ca-certificates.crt",
)

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MAX_ENV_BYTES = 1 << 20
_MAX_METADATA = 64


def check_sandbox_path(path: str, what: str = "path") -> str:
    """Return `path` if it is an absolute path usable inside a sandbox, else raise `InvalidPath`.

    Only the shape is checked here; the guest agent resolves the path inside the sandbox, so
    `..` and symlinks are interpreted by the sandbox's own filesystem, never the host's.
    """
    if not isinstance(path, str) or not path:
        raise InvalidPath(f"{what} must be a non-empty string")
    if "\0" in path:
        raise InvalidPath(f"{what} {path!r} contains a NUL byte")
    if not path.startswith("/"):
        raise InvalidPath(
            f"{what} {path!r} is relative; give an absolute path such as /root/{path}"
        )
    if len(path.encode()) > 4096:
        raise InvalidPath(f"{what} is longer than 4096 bytes")
    return path


def check_mount_path(path: str) -> str:
    """Return `path` if a volume may be mounted there, else raise `InvalidPath` saying why.

    Unlike command paths, mount points must be normal: absolute, no `.` or `..` parts, no
    doubled or trailing slashes. The runtimes create the mount point inside the sandbox's own
    root filesystem, so a symlink on the way is resolved there, never on the host.
    """
    check_sandbox_path(path, "volume path")
    parts = path.split("/")[1:]
    if path == "/":
        raise InvalidPath("a volume cannot be mounted at /; choose a directory such as /data")
    if any(part in ("", ".", "..") for part in parts):
        raise InvalidPath(
            f"volume path {path!r} must be a normal absolute path "
            "(no '.', '..', doubled or trailing '/'), such as /data"
        )
    for reserved in RESERVED_PATHS:
        if _overlaps(path, reserved):
            raise InvalidPath(
                f"a volume cannot be mounted at {path}: it would hide or be hidden by "
                f"{reserved}, which the sandbox needs; choose another directory such as /data"
            )
    return path


def _overlaps(path: str, other: str) -> bool:
    """Whether one of two normal absolute paths is the other or lies below it."""
    return path == other or path.startswith(other + "/") or other.startswith(path + "/")


@dataclass(frozen=True)
class VolumeMount:
    """One volume in a sandbox: which volume (its id, or a name the server resolves to the
    id), where it appears, and whether the sandbox may write to it."""

    path: str
    volume: str
    read_only: bool = False

    def __post_init__(self) -> None:
        check_mount_path(self.path)
        if not isinstance(self.volume, str) or not 0 < len(self.volume) <= 128:
            raise InvalidRequest(
                f"the volume for {self.path} must be a volume's name or id (1 to 128 characters)"
            )
        if not isinstance(self.read_only, bool):
            raise InvalidRequest(f"read_only for {self.path} must be true or false")

    @classmethod
    def parse(cls, value: Any) -> VolumeMount:
        """A mount from itself or from plain data `{path, volume, read_only}`."""
        if isinstance(value, VolumeMount):
            return value
        if not isinstance(value, Mapping):
            raise InvalidRequest("each volume must be an object {path, volume, read_only}")
        unknown = sorted(set(value) - {"path", "volume", "read_only"})
        if unknown or "path" not in value or "volume" not in value:
            raise InvalidRequest(
                "each volume must be an object {path, volume, read_only}"
                + (f"; unknown field(s) {', '.join(map(str, unknown))}" if unknown else "")
            )
        return cls(value["path"], value["volume"], value.get("read_only", False))

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "volume": self.volume, "read_only": self.read_only}


def check_volumes(volumes: Any) -> tuple[VolumeMount, ...]:
    """Validate a sandbox's volumes: at most `MAX_VOLUMES`, each path unique and not inside
    another's (a mount point inside a volume would be made in that volume's files)."""
    if isinstance(volumes, str | bytes | Mapping) or not isinstance(volumes, Sequence):
        raise InvalidRequest("volumes must be a list of {path, volume, read_only} objects")
    mounts = tuple(VolumeMount.parse(v) for v in volumes)
    if len(mounts) > MAX_VOLUMES:
        raise InvalidRequest(f"a sandbox can mount at most {MAX_VOLUMES} volumes")
    for index, mount in enumerate(mounts):
        for other in mounts[:index]:
            if mount.path == other.path:
                raise InvalidPath(f"two volumes are mounted at {mount.path}; give each its own")
            if _overlaps(mount.path, other.path):
                raise InvalidPath(
                    f"volume paths {other.path} and {mount.path} are nested; "
                    "mount volumes side by side, such as /data and /ref"
                )
    return mounts


def check_env(env: Mapping[str, str], what: str = "env") -> dict[str, str]:
    """Validate environment variables: names like `FOO_1`, string values without NUL."""
    if not isinstance(env, Mapping):
        raise InvalidRequest(f"{what} must be a mapping of names to strings")
    total = 0
    for name, value in env.items():
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise InvalidRequest(
                f"{what} name {name!r} is invalid; "
                "use letters, digits and _, not starting with a digit"
            )
        if not isinstance(value, str) or "\0" in value:
            raise InvalidRequest(f"{what} value of {name} must be a string without NUL bytes")
        total += len(name) + len(value.encode()) + 2
    if total > _MAX_ENV_BYTES:
        raise InvalidRequest(f"{what} is larger than {_MAX_ENV_BYTES} bytes")
    return dict(env)


def _check_range(name: str, value: Any, bounds: tuple[float, float], unit: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise InvalidRequest(f"{name} must be a number, got {value!r}")
    low, high = bounds
    if not low <= value <= high:
        raise InvalidRequest(f"{name}={value} is out of range; use {low:g} to {high:g} {unit}")


@dataclass(frozen=True)
class SandboxSpec:
    """The user's request for one sandbox. Invalid values raise `InvalidRequest` on creation.

    Example:
        >>> spec = SandboxSpec(memory_mb=1024, env={"MODE": "test"})
        >>> spec.network
        'none'
    """

    image: str = "debian"
    runtime: str | None = None
    cpu: float = 1.0
    memory_mb: int = 512
    disk_mb: int = 2048
    max_processes: int = 512
    timeout: float = DEFAULT_TIMEOUT
    network: NetworkPolicy = "none"
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str | None = None  # None: the image's working directory, else /root
    metadata: Mapping[str, str] = field(default_factory=dict)
    auto_resume: bool = True  # any use of a paused or hibernated sandbox resumes it first
    idle_timeout: float | None = None  # seconds without use before `on_idle` (docs/lifecycle.md)
    on_idle: IdleAction = "pause"
    keep_alive: bool = False  # never idle, whatever idle_timeout says
    on_timeout: TimeoutAction = "terminate"  # when the lifetime runs out
    # Mounted at start, so never served from a warm pool (see `corral.pools`).
    volumes: tuple[VolumeMount, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.image, str) or not self.image:
            raise InvalidRequest("image must be a non-empty image name such as 'debian' or 'host'")
        if self.runtime is not None and not isinstance(self.runtime, str):
            raise InvalidRequest("runtime must be a runtime name such as 'namespaces' or 'gvisor'")
        _check_range("cpu", self.cpu, CPU_RANGE, "cores")
        _check_range("memory_mb", self.memory_mb, MEMORY_MB_RANGE, "MiB")
        _check_range("disk_mb", self.disk_mb, DISK_MB_RANGE, "MiB")
        _check_range("max_processes", self.max_processes, PROCESSES_RANGE, "processes")
        for name in ("memory_mb", "disk_mb", "max_processes"):
            if not isinstance(getattr(self, name), int):
                raise InvalidRequest(f"{name} must be a whole number")
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, int | float):
            raise InvalidRequest(f"timeout must be a number of seconds, got {self.timeout!r}")
        if not 1 <= self.timeout <= MAX_TIMEOUT:
            raise InvalidRequest(
                f"timeout={self.timeout:g}s is out of range; "
                f"use 1 to {MAX_TIMEOUT:g} seconds (24 h)"
            )
        if self.network not in NETWORK_POLICIES:
            raise InvalidRequest(f"network={self.network!r} is unknown; use 'none' or 'internet'")
        if self.workdir is not None:
            check_sandbox_path(self.workdir, "workdir")
        for name in ("auto_resume", "keep_alive"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequest(f"{name} must be true or false")
        if self.idle_timeout is not None:
            _check_range("idle_timeout", self.idle_timeout, (1.0, MAX_TIMEOUT), "seconds")
        if self.on_idle not in IDLE_ACTIONS:
            raise InvalidRequest(
                f"on_idle={self.on_idle!r} is unknown; use {', '.join(IDLE_ACTIONS)}"
            )
        if self.on_timeout not in TIMEOUT_ACTIONS:
            raise InvalidRequest(
                f"on_timeout={self.on_timeout!r} is unknown; use {', '.join(TIMEOUT_ACTIONS)}"
            )
        object.__setattr__(self, "env", MappingProxyType(check_env(self.env)))
        if not isinstance(self.metadata, Mapping) or len(self.metadata) > _MAX_METADATA:
            raise InvalidRequest(f"metadata must be a mapping of at most {_MAX_METADATA} entries")
        for key, value in self.metadata.items():
            if not isinstance(key, str) or not isinstance(value, str) or len(key) > 256:
                raise InvalidRequest("metadata keys and values must be strings (keys ≤ 256 chars)")
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))
        object.__setattr__(self, "volumes", check_volumes(self.volumes))

    def with_runtime(self, runtime: str) -> SandboxSpec:
        """A copy of this spec that names `runtime` explicitly."""
        return replace(self, runtime=runtime)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (the inverse of `SandboxSpec.from_dict`)."""
        return {
            "image": self.image,
            "runtime": self.runtime,
            "cpu": self.cpu,
            "memory_mb": self.memory_mb,
            "disk_mb": self.disk_mb,
            "max_processes": self.max_processes,
            "timeout": self.timeout,
            "network": self.network,
            "env": dict(self.env),
            "workdir": self.workdir,
            "metadata": dict(self.metadata),
            "auto_resume": self.auto_resume,
            "idle_timeout": self.idle_timeout,
            "on_idle": self.on_idle,
            "keep_alive": self.keep_alive,
            "on_timeout": self.on_timeout,
            "volumes": [mount.to_dict() for mount in self.volumes],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SandboxSpec:
        """Build a spec from plain data, rejecting unknown fields by name."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidRequest(
                f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**data)
