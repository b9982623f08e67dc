"""What a deployment runs: `DeploymentSpec`, validated once, then immutable.

A deployment is an image (or a memory snapshot) and a command serving HTTP on a port, with the
resources of the sandbox it runs in. Its name is its address, `/deploy/{name}/` on the server
(or `{name}.{domain}` with a preview domain), so names are unique on the server.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from corral.core.errors import InvalidRequest
from corral.core.spec import FIELD, MAX_TIMEOUT, NETWORK_POLICIES, SandboxSpec

NAME = r"[a-z](?:[a-z0-9-]{0,38}[a-z0-9])?"  # also a host label and a path segment
_NAME = re.compile(f"^{NAME}$")
DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_START_TIMEOUT = 60.0
MAX_START_TIMEOUT = 600.0
MAX_COMMAND_BYTES = 64 * 1024
MAX_HEALTH_PATH = 1024
LOG_FILE = "/var/log/corral-deployment.log"  # the app's output, inside the sandbox


def check_name(name: Any) -> str:
    """`name` if it may name a deployment, else `InvalidRequest` saying why."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidRequest(
            f"{name!r} cannot name a deployment: use 1 to 40 lowercase letters, digits and "
            "'-', starting with a letter and not ending with '-' (it becomes part of its URL)"
        )
    return name


@dataclasses.dataclass(frozen=True)
class DeploymentSpec:
    """One version of a deployment. Invalid values raise `InvalidRequest` on creation.

    `command` (a list, or a string run by /bin/sh) is started in a fresh sandbox from `image`;
    from a memory `snapshot` it may be left out, as the snapshot's processes run on. Traffic
    goes to `port`; the deployment is healthy once `health_path` answers 2xx or 3xx (or, with
    none, once the port accepts connections), which a new instance must be within
    `start_timeout` seconds. With `min_instances=0` it sleeps after
    `idle_timeout` seconds without requests, and the next request wakes it.
    """

    name: str
    port: int
    image: str | None = None
    snapshot: str | None = None
    command: tuple[str, ...] | str | None = None
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    runtime: str | None = None
    cpu: float = FIELD["cpu"].default
    memory_mb: int = FIELD["memory_mb"].default
    disk_mb: int = FIELD["disk_mb"].default
    network: str = "none"
    min_instances: int = 0
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    health_path: str | None = None
    start_timeout: float = DEFAULT_START_TIMEOUT

    def __post_init__(self) -> None:
        check_name(self.name)
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise InvalidRequest("port must be a whole number from 1 to 65535")
        if not 1 <= self.port <= 65535:
            raise InvalidRequest(f"port must be 1 to 65535, got {self.port}")
        if (self.image is None) == (self.snapshot is None):
            raise InvalidRequest("give exactly one of image and snapshot to deploy from")
        if self.command is None and self.snapshot is None:
            raise InvalidRequest("command is needed to deploy an image: what serves the port?")
        if isinstance(self.command, list):
            object.__setattr__(self, "command", tuple(self.command))
        _check_command(self.command)
        if self.min_instances not in (0, 1) or isinstance(self.min_instances, bool):
            raise InvalidRequest(
                "min_instances must be 0 (sleeps when idle) or 1 (always on); a deployment "
                "runs one instance"
            )
        idle = self.idle_timeout
        if isinstance(idle, bool) or not isinstance(idle, int | float) or not 1 <= idle <= 86400:
            raise InvalidRequest("idle_timeout must be 1 to 86400 seconds")
        start = self.start_timeout
        if (
            isinstance(start, bool)
            or not isinstance(start, int | float)
            or not 1 <= start <= MAX_START_TIMEOUT
        ):
            raise InvalidRequest(f"start_timeout must be 1 to {MAX_START_TIMEOUT:g} seconds")
        if self.network not in NETWORK_POLICIES:
            raise InvalidRequest(f"network={self.network!r} is unknown; use 'none' or 'internet'")
        path = self.health_path
        if path is not None and (
            not isinstance(path, str)
            or not path.startswith("/")
            or len(path) > MAX_HEALTH_PATH
            or any(c.isspace() or ord(c) < 0x21 or ord(c) > 0x7E for c in path)
        ):
            raise InvalidRequest(
                "health_path must be a URL path such as /healthz (printable ASCII, no spaces)"
            )
        # The sandbox's own checks (cpu, memory, env, runtime name) run here too.
        self.sandbox_spec(image=self.image or "debian")

    def sandbox_spec(self, *, image: str, on_idle: str = "pause") -> SandboxSpec:
        """The spec of an instance's sandbox (`image`: the image to use; `on_idle`: hibernate
        where the runtime can, else pause)."""
        return SandboxSpec(
            image=image,
            runtime=self.runtime,
            cpu=self.cpu,
            memory_mb=self.memory_mb,
            disk_mb=self.disk_mb,
            network=self.network,  # type: ignore[arg-type]  # checked above
            env=dict(self.env),
            timeout=MAX_TIMEOUT,  # the supervisor extends it while the deployment lives
            metadata={"corral.deployment": self.name},
            idle_timeout=None if self.min_instances else self.idle_timeout,
            on_idle=on_idle,  # type: ignore[arg-type]  # one of IDLE_ACTIONS
            keep_alive=bool(self.min_instances),
        )

    def argv(self) -> list[str] | None:
        """The command as started: its output appended to `LOG_FILE`, stdin empty."""
        if self.command is None:
            return None
        args = ["/bin/sh", "-c", self.command] if isinstance(self.command, str) else self.command
        redirect = f'mkdir -p /var/log; exec "$@" >>{LOG_FILE} 2>&1 </dev/null'
        return ["/bin/sh", "-c", redirect, "corral-deployment", *args]

    def replace(self, changes: Mapping[str, Any]) -> DeploymentSpec:
        """A new version with `changes` (image and snapshot replace each other)."""
        fields = {f.name for f in dataclasses.fields(self)} - {"name"}
        unknown = set(changes) - fields
        if unknown:
            raise InvalidRequest(
                f"cannot change {', '.join(sorted(unknown))} of a deployment; "
                f"changeable: {', '.join(sorted(fields))}"
            )
        changes = dict(changes)
        if "image" in changes and changes["image"] is not None:
            changes.setdefault("snapshot", None)
        if "snapshot" in changes and changes["snapshot"] is not None:
            changes.setdefault("image", None)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["env"] = dict(self.env)
        if isinstance(self.command, tuple):
            data["command"] = list(self.command)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeploymentSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InvalidRequest(f"unknown deployment fields: {', '.join(sorted(unknown))}")
        return cls(**data)


def _check_command(command: Sequence[str] | str | None) -> None:
    if command is None:
        return
    parts = [command] if isinstance(command, str) else list(command)
    if (
        not parts
        or not all(isinstance(p, str) for p in parts)
        or not parts[0]
        or any("\0" in p for p in parts)
    ):
        raise InvalidRequest("command must be a non-empty string or list of strings (no NUL)")
    if sum(len(p.encode()) for p in parts) > MAX_COMMAND_BYTES:
        raise InvalidRequest(f"command is longer than {MAX_COMMAND_BYTES // 1024} KiB")
