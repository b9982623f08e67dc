"""The runtime interface: how the engine asks an isolation technology to run a sandbox plan.

A runtime is stateless: everything it creates for a sandbox derives from the `SandboxPlan`, so
any method can be called again after an engine restart. Methods block (they mount, write cgroup
files and run short commands); the engine calls them from a worker thread.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from corral.core.errors import InvalidRequest, SandboxFailed
from corral.host import mounts, network, userns
from corral.host.cgroups import Cgroup, CgroupLimits
from corral.host.spares import SpareDisks
from corral.runtimes.plan import SandboxPlan

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


RUNTIME_LOG_TAIL = 4000  # bytes of the runtime's log quoted in errors


@dataclass
class Launch:
    """A started sandbox: the host pid whose exit ends it, and that process if it is our child.

    `start_time` (from /proc, see `corral.host.procs`) tells that pid apart from a later
    process that reuses the number, so a restarted engine never adopts a stranger.
    """

    pid: int
    child: subprocess.Popen[bytes] | None = None
    start_time: int | None = None


def open_runtime_log(plan: SandboxPlan) -> int:
    """A write descriptor on the sandbox's runtime log, for its runtime processes' stderr.

    Never a pipe to the engine: a sandbox must outlive the engine, and a runtime process that
    writes to a pipe nobody reads any more dies of SIGPIPE. Root's, owner-only: it may quote
    the plan.
    """
    return os.open(plan.runtime_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)


def read_runtime_log(plan: SandboxPlan, limit: int = RUNTIME_LOG_TAIL) -> str:
    """The last `limit` bytes the runtime's processes wrote to their log ("" if none)."""
    try:
        with open(plan.runtime_log, "rb") as log:
            size = log.seek(0, os.SEEK_END)
            log.seek(max(0, size - limit))
            return log.read().decode(errors="replace").strip()
    except OSError:
        return ""


# CPU weight (cgroup v2 units, 100 is normal) of an idle pooled sandbox: lowest, so idle ones
# never slow a starting one. One starting for a pool has `lifecycle.FILL_WEIGHT`.
POOLED_WEIGHT = 1


class Runtime(ABC):
    """One isolation technology. Subclasses live one per module in `corral.runtimes`."""

    name: ClassVar[str]
    # Whether an idle sandbox is frozen (pooled until it is claimed; running while it dozes,
    # `corral.engine.doze`): worth it where an idle sandbox still burns CPU (gVisor's Sentry,
    # ~2 % of a core here), not where it sleeps.
    freeze_idle: ClassVar[bool] = False

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.spares: SpareDisks | None = None  # the engine's, if it keeps spare disks

    @abstractmethod
    def unavailable_reason(self) -> str | None:
        """None if this machine can run the runtime, else a sentence saying why not."""

    def create(self, plan: SandboxPlan) -> None:
        """Build everything the sandbox needs on the host (root filesystem, cgroup, config).

        On failure, whatever was built is removed before the error propagates.
        """
        try:
            self.build(plan)
        except BaseException:
            self.destroy(plan)
            raise

    @abstractmethod
    def build(self, plan: SandboxPlan) -> None:
        """The runtime's part of `create`; it may stop half-way, `destroy` cleans up."""

    @abstractmethod
    def start(self, plan: SandboxPlan) -> Launch:
        """Start the sandbox and its guest agent."""

    @abstractmethod
    def pause(self, plan: SandboxPlan) -> None:
        """Stop every process in the sandbox, keeping its memory."""

    @abstractmethod
    def resume(self, plan: SandboxPlan) -> None:
        """Undo `pause`."""

    @abstractmethod
    def destroy(self, plan: SandboxPlan) -> None:
        """Kill the sandbox and remove all it had on the host. Idempotent."""

    def oom_kills(self, plan: SandboxPlan) -> int:
        """How many of the sandbox's processes the kernel has killed for lack of memory."""
        return cgroup_for(plan).oom_kills()

    def set_pooled(self, plan: SandboxPlan, pooled: bool) -> None:
        """Make an idle pooled sandbox use (next to) no CPU: the lowest CPU share under
        contention, frozen where `freeze_idle`; or, claimed, a normal sandbox again."""
        cgroup = cgroup_for(plan)
        if pooled:
            cgroup.set_weight(POOLED_WEIGHT)
            if self.freeze_idle:
                cgroup.freeze()
        else:
            if self.freeze_idle:
                cgroup.thaw()
            cgroup.set_weight(100)

    def doze(self, plan: SandboxPlan) -> None:
        """Freeze a running sandbox that has nothing running but its agent (`freeze_idle`)."""
        cgroup_for(plan).freeze()

    def wake(self, plan: SandboxPlan) -> None:
        """Undo `doze`."""
        cgroup_for(plan).thaw()

    def dozing(self, plan: SandboxPlan) -> bool:
        """Whether the sandbox is frozen by `doze` (or still, by a previous engine)."""
        return cgroup_for(plan).frozen()

    def log_tail(self, plan: SandboxPlan) -> str:
        """The end of what the runtime's own processes wrote about the sandbox ("" if none)."""
        return read_runtime_log(plan)

    def writable_layer(self, plan: SandboxPlan) -> Path | None:
        """The host directory holding what the sandbox changed in its files, as an overlay's
        upper layer, if the runtime keeps it on the host (None: only the sandbox sees it)."""
        return None

    def image_root(self, plan: SandboxPlan) -> Path:
        """The host directory showing the sandbox's image as the sandbox sees it (ownership
        mapped), for comparing its files with the image's."""
        raise InvalidRequest(
            f"the {self.name} runtime shows no image root on the host", code="not_supported"
        )

    # Hooks for memory snapshots; runtimes that can checkpoint override them.
    checkpoints = False  # whether checkpoint/restore keep a sandbox's memory

    def checkpoint_refusal(self, network: str) -> str | None:
        """Why a sandbox with `network` cannot be checkpointed here, or None if it can."""
        return f"the {self.name} runtime cannot save a sandbox's memory; use gvisor"

    def checkpoint(
        self, plan: SandboxPlan, image_dir: Path, *, leave_running: bool = False
    ) -> None:
        """Save the running sandbox (memory and files) into `image_dir`."""
        raise InvalidRequest(
            f"the {self.name} runtime cannot save a sandbox's memory; use gvisor",
            code="not_supported",
        )

    def forget(self, plan: SandboxPlan) -> None:
        """Release what the runtime still holds of a checkpointed (stopped) sandbox."""
        raise InvalidRequest(
            f"the {self.name} runtime makes no checkpoints to forget", code="not_supported"
        )

    def restore(self, plan: SandboxPlan, image_dir: Path) -> Launch:
        """Start a sandbox from a checkpoint in `image_dir`."""
        raise InvalidRequest(
            f"the {self.name} runtime cannot restore a sandbox's memory; use gvisor",
            code="not_supported",
        )


# What root inside a sandbox may do, within the sandbox's own uid range only: what package
# managers and `su` need. No CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_SYS_PTRACE, CAP_SYS_MODULE.
SANDBOX_CAPS = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_SETFCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
)


def prepare_host(
    plan: SandboxPlan, userns_fd: Callable[[], int], spares: SpareDisks | None = None
) -> list[Path]:
    """The host-side setup both runtimes share; returns the image's layers, staged.

    Makes the sandbox's directory and its socket directory (root's, read-only inside and not
    listable, so the sandbox can reach the agent's socket by its secret name but never find,
    replace or add one), formats (or takes one of `spares`) and mounts its quota disk,
    writes its /etc files, makes its network namespace if it has internet, and stages each
    image layer under ``lower/N`` through an idmapped mount: files root owns on the host appear
    owned by the sandbox's own root (its unprivileged host uid, mapped by the namespace whose fd
    `userns_fd` returns: asked for only then, see `userns.creating`).

    Each volume is staged the same way under ``volumes/N`` (see `SandboxPlan.volume_binds`),
    read-only at the mount itself when the sandbox may not write. Volumes keep their files'
    owners as uids inside sandboxes (0 for root): each sandbox's own mapping translates them,
    so a file root wrote in one sandbox belongs to root in every other, under either runtime.
    """
    make_sandbox_dir(plan)
    # Entered, never listed, from inside: the agent's socket is named after its secret.
    plan.socket_dir.mkdir(mode=0o711, exist_ok=True)
    size_mb = plan.limits.disk_bytes // (1024 * 1024)
    spare = spares is not None and spares.take(size_mb, plan.disk_image)
    mounts.create_disk(plan.disk_image, size_mb, plan.disk_dir, formatted=spare)
    write_etc_files(plan)
    if plan.network.policy == "internet":
        network.create(plan.sandbox_id, plan.network.index, plan.host_scope)
    lowers = []
    for index, layer in enumerate(plan.layers):
        lower = plan.dir / "lower" / str(index)
        lower.mkdir(parents=True, exist_ok=True)
        # Read-only at the mount: whatever process of the sandbox's runtime sees a layer, it
        # is shared by every sandbox of the image and must never change.
        mounts.idmapped_bind(Path(layer), lower, userns_fd(), readonly=True)
        lowers.append(lower)
    for volume, bind in zip(plan.volumes, plan.volume_binds, strict=True):
        source = Path(volume.source)
        # The engine mounts the volume before the runtime runs; binding an empty directory
        # instead would let the sandbox write into the host's data directory.
        if not mounts.is_mount_point(source):
            raise SandboxFailed(f"volume {volume.volume_id} is not mounted", code="mount_failed")
        staged = Path(bind.source)
        staged.parent.mkdir(mode=0o711, exist_ok=True)
        staged.mkdir(mode=0o700, exist_ok=True)
        mounts.idmapped_bind(source, staged, userns_fd(), readonly=volume.readonly)
    return lowers


def make_sandbox_dir(plan: SandboxPlan) -> None:
    """The sandbox's directory on the host: root's, entered by the sandbox's own host uid range
    (through its group: the runtime's processes reach their root, socket and volumes from it)
    and by nobody else, so no other local user can read a sandbox's files or its image."""
    plan.dir.mkdir(mode=0o710, parents=True, exist_ok=True)
    os.chown(plan.dir, 0, userns.host_uid(plan.uid_slot))
    plan.dir.chmod(0o710)


def write_etc_files(plan: SandboxPlan) -> None:
    """The per-sandbox files bound over /etc (see `SandboxPlan.etc_binds`)."""
    (plan.dir / "hosts").write_text(
        f"127.0.0.1\tlocalhost\n127.0.1.1\t{plan.hostname}\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
    )
    if plan.network.policy == "internet":
        (plan.dir / "resolv.conf").write_text(
            "".join(f"nameserver {server}\n" for server in plan.network.nameservers)
        )


def cgroup_for(plan: SandboxPlan) -> Cgroup:
    return Cgroup(plan.cgroup_name)


def create_cgroup(plan: SandboxPlan) -> Cgroup:
    cgroup = cgroup_for(plan)
    cgroup.create(
        CgroupLimits(
            memory_bytes=plan.limits.memory_bytes,
            max_processes=plan.limits.max_processes,
            cpu=plan.limits.cpu,
            cpu_weight=plan.limits.cpu_weight,
        )
    )
    return cgroup


def spawn(
    argv: Sequence[str],
    *,
    cgroup: Cgroup,
    netns: Path | None = None,
    uid: int | None = None,
    log_fd: int,
    pass_fds: Sequence[int] = (),
    env: dict[str, str] | None = None,
    enter: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start `argv` already inside the sandbox's cgroup (and network namespace, and host uid).

    Joining happens in the child before exec, so not even the runtime's first process ever
    runs outside the limits: through the `enter` program (runtimes/enter.c) where it is built,
    else in a `preexec_fn`, which forks the whole engine (7 to 10 ms more). The child starts
    its own session, its stderr is `log_fd` (see `open_runtime_log`) and nothing ties it to
    the engine's life: the sandbox survives an engine restart.
    """
    env = env if env is not None else {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    netns_fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC) if netns is not None else -1
    command, fds = list(argv), list(pass_fds)
    preexec: Callable[[], None] | None = functools.partial(_join, cgroup.procs_files, netns_fd, uid)
    err_r = err_w = -1
    report = ""
    try:
        if enter is not None and os.access(enter, os.X_OK):
            err_r, err_w = os.pipe()
            head = [str(err_w), str(netns_fd), str(-1 if uid is None else uid)]
            program = _program(argv[0], env)
            command = [str(enter), *head, *cgroup.procs_files, "--", program, *argv]
            fds += [fd for fd in (netns_fd, err_w) if fd >= 0]
            preexec = None
        child = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_fd,
            pass_fds=tuple(fds),
            env=env,
            start_new_session=True,
            preexec_fn=preexec,  # noqa: PLW1509 - the only way left to join cgroups before exec
        )
        if err_w >= 0:
            os.close(err_w)
            err_w = -1
            report = _read_all(err_r).decode(errors="replace").strip()  # closed by the exec
    except (OSError, subprocess.SubprocessError) as exc:
        raise SandboxFailed(f"could not start {argv[0]}: {exc}", code="runtime_failed") from exc
    finally:
        for fd in (netns_fd, err_r, err_w):
            if fd >= 0:
                os.close(fd)
    if report:
        child.wait()
        raise SandboxFailed(f"could not start {argv[0]}: {report}", code="runtime_failed")
    return child


def _program(name: str, env: dict[str, str]) -> str:
    """`name` as exec would find it on `env`'s PATH."""
    found = shutil.which(name, path=os.pathsep.join(os.get_exec_path(env)))
    if found is None:
        raise SandboxFailed(f"could not start {name}: it is not installed", code="runtime_failed")
    return found


def _read_all(fd: int) -> bytes:
    data = b""
    while chunk := os.read(fd, 4096):
        data += chunk
    return data


def _join(procs_files: Sequence[str], netns_fd: int, uid: int | None) -> None:
    """In the child of a `spawn` without `enter`, before exec: what `enter` does."""
    for path in procs_files:
        fd = os.open(path, os.O_WRONLY)
        os.write(fd, b"0")
        os.close(fd)
    if netns_fd >= 0 and _libc.setns(netns_fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns(net) failed")
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
