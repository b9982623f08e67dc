"""What a user asks for when creating a sandbox: `SandboxSpec`, validated once, then immutable.

Every field is defined once, in `SPEC_FIELDS`, with its default, its bounds or choices and what
it means; the HTTP schema, the SDK's `create` and the CLI's options take theirs from there (a
test checks each against it). Every limit has a secure default (no network, 1 CPU, 512 MiB, a
300 s lifetime) and a hard ceiling, so a typo never turns into a sandbox that can take the host
down.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Literal

from corral.core.egress import EgressPolicy
from corral.core.errors import InvalidPath, InvalidRequest

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
VOLUME_SIZE_MB_RANGE = (16, 1024 * 1024)  # 16 MiB to 1 TiB
DEFAULT_VOLUME_SIZE_MB = 1024
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


@dataclass(frozen=True)
class SpecField:
    """One field of a sandbox spec: its default, its bounds or choices, and what it means."""

    name: str
    default: Any
    help: str
    bounds: tuple[float, float] | None = None
    unit: str = ""
    choices: tuple[str, ...] = ()
    # Decided when the sandbox starts: what a pool's template and a snapshot fix.
    fixed_at_start: bool = False

    @property
    def description(self) -> str:
        """`help`, with the bounds or choices: for the API's schema and the CLI's help."""
        if self.bounds is not None:
            low, high = self.bounds
            return f"{self.help} ({_number(low)} to {_number(high)} {self.unit})".replace(" )", ")")
        if self.choices:
            return f"{self.help}: {' or '.join(self.choices)}"
        return self.help


SPEC_FIELDS: tuple[SpecField, ...] = (
    SpecField(
        "image",
        "debian",
        "the image: debian, host, or the id or name of an image you built",
        fixed_at_start=True,
    ),
    SpecField(
        "runtime",
        None,
        "namespaces or gvisor; default: the strongest this machine runs",
        fixed_at_start=True,
    ),
    SpecField("cpu", 1.0, "CPU limit", CPU_RANGE, "cores", fixed_at_start=True),
    SpecField("memory_mb", 512, "memory limit", MEMORY_MB_RANGE, "MiB", fixed_at_start=True),
    SpecField("disk_mb", 2048, "disk quota", DISK_MB_RANGE, "MiB", fixed_at_start=True),
    SpecField("max_processes", 512, "most processes at once", PROCESSES_RANGE, fixed_at_start=True),
    SpecField(
        "timeout",
        DEFAULT_TIMEOUT,
        "lifetime, counted only while running",
        (1, MAX_TIMEOUT),
        "seconds",
    ),
    SpecField("network", "none", "network access", choices=NETWORK_POLICIES, fixed_at_start=True),
    SpecField(
        "egress",
        None,
        "where an internet sandbox may connect: {allow: [names, *.wildcards, CIDRs] or null "
        "for anywhere, deny: [...]}; see docs/network.md",
    ),
    SpecField("env", {}, "environment variables of every command"),
    SpecField("workdir", None, "working directory of commands; default: the image's, else /root"),
    SpecField("metadata", {}, "labels to find sandboxes by"),
    SpecField("auto_resume", True, "any use of a paused or hibernated sandbox resumes it"),
    SpecField(
        "idle_timeout", None, "seconds without use before on_idle", (1, MAX_TIMEOUT), "seconds"
    ),
    SpecField("on_idle", "pause", "what happens when idle", choices=IDLE_ACTIONS),
    SpecField("keep_alive", False, "never idle, whatever idle_timeout says"),
    SpecField(
        "on_timeout",
        "terminate",
        "what happens when the lifetime runs out",
        choices=TIMEOUT_ACTIONS,
    ),
    SpecField("volumes", (), f"persistent volumes to mount (at most {MAX_VOLUMES})"),
)
FIELD = {spec_field.name: spec_field for spec_field in SPEC_FIELDS}
FIXED_AT_START = tuple(f.name for f in SPEC_FIELDS if f.fixed_at_start)


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


def check_volume_size(size_mb: Any) -> int:
    """Return `size_mb` if it is a volume size in range (whole MiB), else `InvalidRequest`."""
    low, high = VOLUME_SIZE_MB_RANGE
    if isinstance(size_mb, bool) or not isinstance(size_mb, int) or not low <= size_mb <= high:
        raise InvalidRequest(
            f"size_mb={size_mb!r} is out of range; a volume is {low} to {high} MiB (whole number)"
        )
    return size_mb


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


def _check_range(name: str, value: Any, spec_field: SpecField) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise InvalidRequest(f"{name} must be a number, got {value!r}")
    assert spec_field.bounds is not None
    low, high = spec_field.bounds
    if not low <= value <= high:
        unit = spec_field.unit or "processes"
        raise InvalidRequest(
            f"{name}={value} is out of range; use {_number(low)} to {_number(high)} {unit}"
        )


def _number(value: float) -> str:
    """A bound as people write it: 1,048,576 rather than 1.04858e+06."""
    return f"{int(value):,}" if value == int(value) else f"{value:g}"


@dataclass(frozen=True)
class SandboxSpec:
    """The user's request for one sandbox. Invalid values raise `InvalidRequest` on creation.

    Example:
        >>> spec = SandboxSpec(memory_mb=1024, env={"MODE": "test"})
        >>> spec.network
        'none'
    """

    image: str = FIELD["image"].default
    runtime: str | None = FIELD["runtime"].default
    cpu: float = FIELD["cpu"].default
    memory_mb: int = FIELD["memory_mb"].default
    disk_mb: int = FIELD["disk_mb"].default
    max_processes: int = FIELD["max_processes"].default
    timeout: float = FIELD["timeout"].default
    network: NetworkPolicy = FIELD["network"].default
    egress: EgressPolicy | None = FIELD["egress"].default
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str | None = FIELD["workdir"].default
    metadata: Mapping[str, str] = field(default_factory=dict)
    auto_resume: bool = FIELD["auto_resume"].default
    idle_timeout: float | None = FIELD["idle_timeout"].default  # see docs/lifecycle.md
    on_idle: IdleAction = FIELD["on_idle"].default
    keep_alive: bool = FIELD["keep_alive"].default
    on_timeout: TimeoutAction = FIELD["on_timeout"].default
    # Mounted at start, so never served from a warm pool (see `corral.engine.pools`).
    volumes: tuple[VolumeMount, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.image, str) or not self.image:
            raise InvalidRequest("image must be a non-empty image name such as 'debian' or 'host'")
        if self.runtime is not None and not isinstance(self.runtime, str):
            raise InvalidRequest("runtime must be a runtime name such as 'namespaces' or 'gvisor'")
        for name in ("cpu", "memory_mb", "disk_mb", "max_processes"):
            _check_range(name, getattr(self, name), FIELD[name])
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
        if self.egress is not None:
            object.__setattr__(self, "egress", EgressPolicy.parse(self.egress))
            if self.network != "internet":
                raise InvalidRequest(
                    "egress rules apply to internet sandboxes: set network='internet' as well",
                    code="invalid_network_rule",
                )
        if self.workdir is not None:
            check_sandbox_path(self.workdir, "workdir")
        for name in ("auto_resume", "keep_alive"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequest(f"{name} must be true or false")
        if self.idle_timeout is not None:
            _check_range("idle_timeout", self.idle_timeout, FIELD["idle_timeout"])
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
            "egress": None if self.egress is None else self.egress.to_dict(),
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


DEFAULT_SPEC = SandboxSpec()  # every field at its default: for signatures that repeat them
