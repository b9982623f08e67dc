"""A sandbox plan: everything a runtime needs to build one sandbox, as plain, printable data.

The engine turns a `SandboxSpec` and a resolved image into a `SandboxPlan`; the runtime only
executes plans. Every host path a runtime touches for a sandbox derives from the plan, so
cleanup is idempotent and a restarted engine can rebuild the plan from what it saved.

What is mounted over the sandbox's root is planned here once, as a list of operations
(`SandboxPlan.mounts`), in the manner of bubblewrap's setup operations; each runtime renders
that list in its own terms (bwrap arguments, an OCI spec) and adds nothing of its own.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from corral.agent import protocol
from corral.core.spec import NetworkPolicy
from corral.host.scope import HostScope

HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"

DEFAULT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
}


RUN_BYTES = 16 * 1024 * 1024  # /run: sockets and pid files, never data


@dataclass(frozen=True)
class Bind:
    """A host directory or file made visible inside the sandbox."""

    source: str  # host path
    target: str  # sandbox path
    readonly: bool = True


@dataclass(frozen=True)
class Tmpfs:
    """A private, size-bounded memory filesystem (its pages count against the sandbox's
    memory limit)."""

    target: str
    size_bytes: int
    mode: int


@dataclass(frozen=True)
class KernelFs:
    """A filesystem the sandbox's kernel provides: `proc` (its own processes only, in its
    pid namespace), `dev` (a minimal set of device nodes) or `sys` (read-only)."""

    kind: str
    target: str


MountOp = Bind | Tmpfs | KernelFs


@dataclass(frozen=True)
class PlanVolume:
    """A persistent volume in the sandbox: `source` is its filesystem, mounted on the host by
    the engine (`corral.engine.volumes`); the runtime binds it at `target` through an idmapped mount
    staged in the sandbox's directory (`SandboxPlan.volume_binds`)."""

    volume_id: str
    source: str  # host mount point of the volume's disk
    target: str  # sandbox path
    readonly: bool = False


@dataclass(frozen=True)
class PlanLimits:
    """Resource limits, in the units the kernel wants."""

    cpu: float
    memory_bytes: int
    disk_bytes: int
    max_processes: int
    tmp_bytes: int
    # CPU share under contention, 1 to 10000 (cgroup v2's cpu.weight; 100 is everyone's
    # default). Idle pooled sandboxes start at 1, so filling a pool never slows live work.
    cpu_weight: int = 100


@dataclass(frozen=True)
class PlanNetwork:
    """The sandbox's network: `none` (own loopback only) or `internet` (NAT, filtered)."""

    policy: NetworkPolicy
    index: int = -1  # the sandbox's /30 in the internet address pool
    nameservers: tuple[str, ...] = ()


@dataclass(frozen=True)
class SandboxPlan:
    """What to build for one sandbox."""

    sandbox_id: str
    runtime: str
    directory: str  # per-sandbox host directory, owned by the engine
    layers: tuple[str, ...]  # read-only root layers, topmost first
    binds: tuple[Bind, ...]
    env: Mapping[str, str]
    workdir: str
    limits: PlanLimits
    network: PlanNetwork
    uid_slot: int  # the sandbox's private host uid range (see corral.host.userns)
    agent_dir: str  # host directory holding the guest agent's code
    hostname: str = "sandbox"
    # Booted to be saved as a boot image (see `corral.engine.boots`): its agent may rename the
    # sandboxes restored from it, once each.
    template: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)
    volumes: tuple[PlanVolume, ...] = ()
    scope: int | None = None  # the engine's share of the host (`corral.host.scope`)

    @property
    def host_scope(self) -> HostScope:
        return HostScope(self.scope)

    # Paths derived from `directory`; nothing else decides where a sandbox's files live.
    @property
    def dir(self) -> Path:
        return Path(self.directory)

    @property
    def socket_dir(self) -> Path:
        return self.dir / "sock"

    @property
    def runtime_log(self) -> Path:
        """Where the runtime's own processes write their errors (never a pipe to the engine)."""
        return self.dir / "runtime.log"

    @property
    def disk_image(self) -> Path:
        return self.dir / "disk.img"

    @property
    def disk_dir(self) -> Path:
        return self.dir / "disk"

    @property
    def rootfs(self) -> Path:
        return self.dir / "rootfs"

    @property
    def volume_binds(self) -> tuple[Bind, ...]:
        """Each volume as the runtime binds it: from its staged, idmapped mount (made by
        `runtimes.base.prepare_host` under ``volumes/N``), never from the volume's own mount."""
        return tuple(
            Bind(str(self.dir / "volumes" / str(index)), volume.target, volume.readonly)
            for index, volume in enumerate(self.volumes)
        )

    @property
    def etc_binds(self) -> list[tuple[str, str]]:
        """(host file, sandbox path) pairs bound read-only over the image's own files.

        /etc/hosts names the sandbox. Internet sandboxes also get Corral's resolver (their
        gateway) and the host's CA bundle, so TLS works behind the same proxies the host trusts.
        """
        binds = [(str(self.dir / "hosts"), "/etc/hosts")]
        if self.network.policy == "internet":
            binds.append((str(self.dir / "resolv.conf"), "/etc/resolv.conf"))
            if Path(HOST_CA_BUNDLE).is_file():
                binds.append((HOST_CA_BUNDLE, HOST_CA_BUNDLE))
        return binds

    def mounts(self) -> list[MountOp]:
        """What is mounted over the sandbox's root, in order: a later mount lies on top of an
        earlier one (so the /etc files cover an image's bound /etc directories)."""
        return [
            KernelFs("proc", "/proc"),
            KernelFs("dev", "/dev"),
            KernelFs("sys", "/sys"),
            Tmpfs("/tmp", self.limits.tmp_bytes, 0o1777),
            Tmpfs("/run", RUN_BYTES, 0o755),
            # The agent's code and the directory of its socket, read-only: the sandbox can
            # run the one and connect to the other, but replace neither.
            Bind(self.agent_dir, protocol.GUEST_AGENT_DIR),
            Bind(str(self.socket_dir), protocol.GUEST_SOCKET_DIR),
            *self.binds,
            *self.volume_binds,
            *(Bind(source, target) for source, target in self.etc_binds),
        ]

    @property
    def enter_program(self) -> Path:
        """The engine's `enter` program (runtimes/enter.c, see `runtimes.base.spawn`), built
        by the engine beside the agent's directory (`engine.datadir.install_tools`)."""
        return Path(self.agent_dir).parent / "bin" / "enter"

    @property
    def reaper_program(self) -> Path:
        """The engine's `reaper` program (runtimes/reaper.c, see `runtimes.gvisor.run_reaped`),
        built beside `enter_program`."""
        return self.enter_program.with_name("reaper")

    @property
    def cgroup_name(self) -> str:
        return f"{self.host_scope.cgroup_parent}/{self.sandbox_id}"

    @property
    def agent_argv(self) -> list[str]:
        """How the sandbox's first process, the guest agent, is started."""
        return [
            "python3",
            "-I",
            "-S",
            protocol.GUEST_AGENT_START,
            protocol.GUEST_SOCKET_DIR,
        ]

    @property
    def guest_env(self) -> dict[str, str]:
        return {**DEFAULT_ENV, **self.env}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["env"] = dict(self.env)
        data["extra"] = dict(self.extra)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SandboxPlan:
        values = dict(data)
        values["layers"] = tuple(values["layers"])
        values["binds"] = tuple(Bind(**b) for b in values["binds"])
        # Records written before volumes existed have none.
        values["volumes"] = tuple(PlanVolume(**v) for v in values.get("volumes", ()))
        values["limits"] = PlanLimits(**values["limits"])
        network = dict(values["network"])
        network["nameservers"] = tuple(network.get("nameservers", ()))
        values["network"] = PlanNetwork(**network)
        return cls(**values)

    def describe(self) -> str:
        """The plan as indented JSON, for logs and debugging."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
