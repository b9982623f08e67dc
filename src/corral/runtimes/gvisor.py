"""The `gvisor` runtime: runsc, gVisor's user-space kernel, from an OCI bundle built from the plan.

The sandbox's system calls are served by the Sentry, a kernel written in Go that runs as an
unprivileged, seccomp-confined host process; files come through the Gofer. Untrusted code
never talks to the host kernel directly.

Configured so that a later memory checkpoint captures everything: the root overlay lives inside
the sandbox (`--overlay2`, its file store on the sandbox's quota disk, so the disk quota gives
ENOSPC inside) and the agent reaches the host only through a Unix socket it dials
(`--host-uds=open`). Measured behaviour on this class of machine is recorded in
docs/runtimes.md: notably the host's OOM killer would end the whole sandbox (so the agent kills
the largest process first: see `memory_headroom`), and `--network=sandbox` cannot run on
kernels where runsc mistakes every network namespace for the root one, so internet sandboxes
use `--network=host` inside their own network namespace (checkpoints then are refused).
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath
from typing import Any

from corral.core.errors import CheckpointFailed, SandboxFailed
from corral.host import mounts, network, userns
from corral.host.cgroups import CPU_PERIOD_US, layout, shares
from corral.runtimes.base import (
    SANDBOX_CAPS,
    Launch,
    Runtime,
    cgroup_for,
    open_runtime_log,
    prepare_host,
    read_runtime_log,
)
from corral.runtimes.plan import Bind, MountOp, SandboxPlan, Tmpfs

log = logging.getLogger(__name__)

# gVisor's host pids cgroup counts the Sentry's threads and one stub per guest process (about
# 25 + 2.2 per process, measured) and reaching it crashes the Sentry, so it only backs up the
# real process limit: RLIMIT_NPROC, which the Sentry enforces for the guest (fork gets EAGAIN).
PIDS_BASE = 64
SUMMARY = 1000  # characters of a failed runsc command's error in the answer
LOGGED = 16384  # and in the server's log
PIDS_PER_PROCESS = 3
COMMAND_TIMEOUT = 60
# The host cgroup's memory limit above the budget (see `memory_headroom`; measured in
# docs/runtimes.md).
HEADROOM_MIN = 64 << 20
HEADROOM_FRACTION = 4


class GVisorRuntime(Runtime):
    """Sandboxes as runsc containers, one sandbox per runsc sandbox."""

    name = "gvisor"
    checkpoints = True
    freeze_idle = True  # the installed runsc's Sentry wakes every 400 µs even when idle

    def __init__(self, data_dir: Path, runsc: str = "runsc") -> None:
        super().__init__(data_dir)
        self.runsc = runsc
        self.state_dir = data_dir / "runsc"

    def unavailable_reason(self) -> str | None:
        if os.geteuid() != 0:
            return "the engine must run as root to start runsc"
        if shutil.which(self.runsc) is None:
            return f"runsc ({self.runsc}) is not installed (run scripts/setup as root)"
        if not layout():
            return "no usable cgroup hierarchy under /sys/fs/cgroup"
        try:
            version = subprocess.run(
                [self.runsc, "--version"], capture_output=True, text=True, timeout=10, check=True
            ).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            return f"runsc does not run: {exc}"
        try:
            flags = subprocess.run(  # it prints the list on stderr
                [self.runsc, "flags"], capture_output=True, text=True, timeout=10, check=False
            ).stderr
        except (OSError, subprocess.SubprocessError) as exc:
            return f"runsc does not run: {exc}"
        # Builds before mid-2023, such as Debian bookworm's own 20221219, run (ptrace platform)
        # but fail a fifth of the gVisor tests here: statx breaks `ls -l`, the disk and CPU
        # quotas, RLIMIT_NPROC and internet sandboxes do not hold. Refuse them by name.
        if "dir=" not in flags or "-host-uds" not in flags:
            release = version.split()[2] if len(version.split()) > 2 else "?"
            return (
                f"runsc {release} is too old: it cannot enforce the disk quota and limits; "
                "install runsc from bookworm-backports (scripts/setup does)"
            )
        return None

    def flags(self, plan: SandboxPlan) -> list[str]:
        """runsc's global flags for `plan`; the same on every command for one sandbox."""
        return [
            "--root",
            str(self.state_dir),
            "--network=host" if plan.network.policy == "internet" else "--network=none",
            f"--overlay2=root:dir={plan.disk_dir}",
            "--host-uds=open",
        ]

    def _runsc(
        self, plan: SandboxPlan, *args: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        argv = [self.runsc, *self.flags(plan), *args]
        try:
            result = subprocess.run(
                argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise SandboxFailed(f"runsc {args[0]} timed out", code="runtime_failed") from exc
        if check and result.returncode != 0:
            detail = result.stderr.strip()
            log.warning("runsc %s of %s failed: %s", args[0], plan.sandbox_id, detail[:LOGGED])
            raise SandboxFailed(
                f"runsc {args[0]} failed: {failure_summary(detail)}", code="runtime_failed"
            )
        return result

    def build(self, plan: SandboxPlan) -> None:
        self.state_dir.mkdir(mode=0o700, exist_ok=True)
        # The Sentry and Gofer run as the sandbox's own unprivileged host uid (`oci_spec`), so
        # they see the image through idmapped mounts that make that uid the owner.
        with userns.creating(plan.uid_slot) as userns_fd:
            lowers = prepare_host(plan, userns_fd, self.spares)
        # The overlay's file store lives on the sandbox's quota disk: a full disk is ENOSPC.
        uid = userns.host_uid(plan.uid_slot)
        plan.disk_dir.chmod(0o700)
        os.chown(plan.disk_dir, uid, uid)
        # gVisor takes one root directory: the image's layers stacked on the host, read-only,
        # under a layer with the mount points of the sandbox's binds.
        plan.rootfs.mkdir(exist_ok=True)
        try:
            points = _mount_points(plan, lowers, uid)
            mounts.mount(
                "overlay",
                plan.rootfs,
                "overlay",
                mounts.MS_RDONLY | mounts.MS_NODEV | mounts.MS_NOSUID,
                "lowerdir=" + ":".join(str(lower) for lower in (points, *lowers)),
            )
        finally:
            mounts.unmount_all(lowers)
        root = self.image_root(plan)
        bundle = plan.dir / "bundle"
        bundle.mkdir(mode=0o700, exist_ok=True)
        (bundle / "config.json").write_text(json.dumps(self.oci_spec(plan, root), indent=1))

    def oci_spec(self, plan: SandboxPlan, root: Path) -> dict[str, Any]:
        """The OCI runtime spec for `plan` (printable, for debugging)."""
        net: dict[str, str] = {"type": "network"}
        if plan.network.policy == "internet":
            net["path"] = str(network.netns_path(plan.sandbox_id))
        uid = userns.host_uid(plan.uid_slot)
        ids = [{"containerID": 0, "hostID": uid, "size": userns.RANGE}]
        return {
            "ociVersion": "1.0.2",
            "hostname": plan.hostname,
            "root": {"path": str(root), "readonly": False},
            "process": _oci_process(plan),
            "mounts": [_oci_mount(operation) for operation in plan.mounts()],
            "linux": {
                # A user namespace with the sandbox's private uid range: the Sentry, which serves
                # every system call of the sandbox, runs as an unprivileged host uid.
                "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "user")] + [net],
                "uidMappings": ids,
                "gidMappings": ids,
                "cgroupsPath": "/" + plan.cgroup_name,
                "resources": {
                    "memory": {"limit": plan.limits.memory_bytes + memory_headroom(plan)},
                    "cpu": {
                        "quota": max(1000, int(plan.limits.cpu * CPU_PERIOD_US)),
                        "period": CPU_PERIOD_US,
                        "shares": shares(plan.limits.cpu_weight),
                    },
                    "pids": {"limit": PIDS_BASE + PIDS_PER_PROCESS * plan.limits.max_processes},
                },
            },
        }

    def start(self, plan: SandboxPlan) -> Launch:
        launch = self._launch(plan, "create")
        self._runsc(plan, "start", plan.sandbox_id)
        return launch

    def checkpoint_refusal(self, network: str) -> str | None:
        if network == "internet":
            # Internet sandboxes run with --network=host in their own namespace (see the
            # module's docstring), and runsc refuses to checkpoint hostinet.
            return "runsc cannot checkpoint a sandbox with internet access"
        return None

    def image_root(self, plan: SandboxPlan) -> Path:
        return plan.rootfs  # what `build` hands runsc as the root

    def checkpoint(
        self, plan: SandboxPlan, image_dir: Path, *, leave_running: bool = False
    ) -> None:
        """Save the sandbox's memory and filesystem into `image_dir`; unless `leave_running`,
        the sandbox stops and its runsc state is deleted (its directory, disk and mounts stay,
        for `restore`). The agent must have hung up first (see `AgentLink.quiesce`)."""
        image_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        extra = ["--leave-running"] if leave_running else []
        # Uncompressed: faster both ways, and a compressed image leaves the Sentry and every
        # restored copy holding 30 to 90 MiB more (measured).
        try:
            self._runsc(
                plan,
                "checkpoint",
                f"--image-path={image_dir}",
                "--compression=none",
                *extra,
                plan.sandbox_id,
            )
        except SandboxFailed as exc:  # runsc's own failure (seen: a crash in its encoder)
            raise CheckpointFailed(
                f"the sandbox's memory could not be saved, and nothing was: {exc.message}. "
                "Try again; if it fails again, something running in it cannot be checkpointed"
            ) from exc
        if not leave_running:
            cgroup = cgroup_for(plan)
            if cgroup.exists():
                cgroup.kill_all()

    def forget(self, plan: SandboxPlan) -> None:
        """Delete runsc's state of a checkpointed sandbox (the engine does it in the
        background; `restore` needs it done)."""
        # Once may not do: right after a checkpoint runsc can still list it as running.
        for _ in range(3):
            self._runsc(plan, "delete", "-force", plan.sandbox_id, check=False)
            if self._runsc(plan, "state", plan.sandbox_id, check=False).returncode != 0:
                return

    def restore(self, plan: SandboxPlan, image_dir: Path) -> Launch:
        """Start the sandbox again from the checkpoint in `image_dir`, exactly where it was."""
        return self._launch(plan, "restore", f"--image-path={image_dir}", "--detach")

    def _launch(self, plan: SandboxPlan, command: str, *extra: str) -> Launch:
        """`runsc create` or `runsc restore`, detached from the engine; the Sentry's pid."""
        pid_file = plan.dir / "sentry.pid"
        pid_file.unlink(missing_ok=True)
        argv = [
            self.runsc,
            *self.flags(plan),
            command,
            *extra,
            "--bundle",
            str(plan.dir / "bundle"),
            "--pid-file",
            str(pid_file),
            plan.sandbox_id,
        ]
        # runsc hands its own stdio down to the Sentry and the Gofer, and the Sentry makes them
        # the container's stdio. None may be a pipe to the engine: once the engine is gone a
        # write to it would kill runsc (SIGPIPE) and the sandbox with it. The agent points its
        # stdio at /dev/null at once, so only runsc's own messages reach the log.
        log_fd = open_runtime_log(plan)
        try:
            returncode = run_reaped(argv, plan.reaper_program, log_fd, COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            raise SandboxFailed(f"runsc {command} timed out", code="runtime_failed") from exc
        finally:
            os.close(log_fd)
        if returncode != 0:
            detail = read_runtime_log(plan, 2000)
            raise SandboxFailed(f"runsc {command} failed: {detail}", code="runtime_failed")
        return Launch(int(pid_file.read_text()))

    def pause(self, plan: SandboxPlan) -> None:
        self._runsc(plan, "pause", plan.sandbox_id)

    def resume(self, plan: SandboxPlan) -> None:
        self._runsc(plan, "resume", plan.sandbox_id)

    def destroy(self, plan: SandboxPlan) -> None:
        cgroup = cgroup_for(plan)
        # Killed first, the Sentry and Gofer are gone (reaped by the reaper, see `run_reaped`)
        # by the time `delete` looks for them, which it would otherwise wait for.
        if cgroup.exists():
            cgroup.kill_all()
        if self.state_dir.is_dir():
            self._runsc(plan, "delete", "-force", plan.sandbox_id, check=False)
        if cgroup.exists():
            cgroup.destroy()
        network.destroy(plan.sandbox_id, plan.network.index, plan.host_scope)
        mounts.remove_tree(plan.dir)


def run_reaped(argv: list[str], reaper: Path, log_fd: int, timeout: float) -> int:
    """Run `argv` (a runsc command that leaves the sandbox's processes running) to its end in
    a session of its own, with no stdio but `log_fd` as stderr; its exit code.

    Under the `reaper` program (runtimes/reaper.c) where it is built, which stays the parent
    of what `argv` leaves running and reaps it the moment it exits: otherwise the host's init
    inherits those processes, and `runsc delete` waits until the init has reaped them (1.4 to
    2 s a terminate on this project's VMs). Raises `subprocess.TimeoutExpired` (and kills it)
    when `argv` runs longer than `timeout`."""
    path = "/usr/sbin:/usr/bin:/sbin:/bin"
    options: dict[str, Any] = {
        "stdin": subprocess.DEVNULL,
        "stdout": subprocess.DEVNULL,
        "stderr": log_fd,
        "env": {"PATH": path},
        "start_new_session": True,
    }
    if not os.access(reaper, os.X_OK):
        launching = subprocess.Popen(argv, **options)
        try:
            return launching.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            launching.kill()
            launching.wait()
            raise
    status_r, status_w = os.pipe()
    try:
        # The reaper's first process forks the reaper and exits: this wait is immediate.
        subprocess.run(
            [str(reaper), str(status_w), shutil.which(argv[0], path=path) or argv[0], *argv],
            pass_fds=(status_w,),
            check=False,
            timeout=timeout,
            **options,
        )
        os.close(status_w)
        status_w = -1
        return _reaped_status(status_r, argv, timeout)
    finally:
        os.close(status_r)
        if status_w >= 0:
            os.close(status_w)


def _reaped_status(status_r: int, argv: list[str], timeout: float) -> int:
    """The exit code the reaper reports on `status_r` (see reaper.c) for `argv`."""
    deadline = time.monotonic() + timeout
    report = b""
    waiting = select.poll()  # not select(): a busy engine's descriptors pass 1024
    waiting.register(status_r, select.POLLIN)
    while len(report) < 8:
        left = deadline - time.monotonic()
        if not waiting.poll(max(left, 0) * 1000):
            if len(report) >= 4:  # it started: end it, as Popen.wait's caller would
                os.kill(int.from_bytes(report[:4], sys.byteorder, signed=True), signal.SIGKILL)
            raise subprocess.TimeoutExpired(argv, timeout)
        chunk = os.read(status_r, 8 - len(report))
        if not chunk:
            raise SandboxFailed(f"cannot start {argv[0]}: its reaper failed", code="runtime_failed")
        report += chunk
    return os.waitstatus_to_exitcode(int.from_bytes(report[4:], sys.byteorder, signed=True))


def failure_summary(stderr: str) -> str:
    """What the caller (a tenant) is told of runsc's failure: its error, without the
    goroutine traces of a Go panic. Those hold the Sentry's addresses, which would help an
    escape from the sandbox; the server's log has them."""
    kept: list[str] = []
    for line in stderr.strip().splitlines():
        if line.startswith("goroutine "):
            break
        if line.startswith("\t"):  # a frame's file and offset: its function line goes too
            kept = kept[:-1]
            break
        kept.append(line)
    summary = "\n".join(kept).strip()
    return summary if len(summary) <= SUMMARY else summary[:SUMMARY] + " [...]"


def memory_headroom(plan: SandboxPlan) -> int:
    """What the host's cgroup allows above the sandbox's budget. The Sentry is one host
    process, so the host's OOM killer would end the whole sandbox; inside, the agent kills the
    largest process past the budget instead, and the headroom absorbs what an allocation adds
    before the agent sees it and what the Sentry has not yet handed back to the host."""
    return max(HEADROOM_MIN, plan.limits.memory_bytes // HEADROOM_FRACTION)


def _oci_process(plan: SandboxPlan) -> dict[str, Any]:
    """The sandbox's first process, its guest agent: root inside, the sandbox's capabilities,
    RLIMIT_NPROC as the process limit (the Sentry enforces it)."""
    caps = list(SANDBOX_CAPS)
    # A boot image's agent alone, to rename each sandbox restored from it (`shield.take_identity`);
    # outside the bounding set, so nothing it starts can have it.
    held = [*caps, "CAP_SYS_ADMIN"] if plan.template else caps
    nproc = plan.limits.max_processes
    return {
        "terminal": False,
        "user": {"uid": 0, "gid": 0},
        # The agent kills the largest process past the budget (see `corral.agent.memory`).
        "args": [*plan.agent_argv, str(plan.limits.memory_bytes)],
        "env": [f"{k}={v}" for k, v in plan.guest_env.items()],
        "cwd": "/",
        "capabilities": {"bounding": caps, "effective": held, "permitted": held},
        "noNewPrivileges": True,
        "rlimits": [{"type": "RLIMIT_NPROC", "hard": nproc, "soft": nproc}],
    }


def _oci_mount(operation: MountOp) -> dict[str, Any]:
    """One planned mount as an OCI mount; the Sentry serves every one of them itself."""
    if isinstance(operation, Bind):
        access = "ro" if operation.readonly else "rw"
        return {
            "destination": operation.target,
            "type": "bind",
            "source": operation.source,
            "options": ["rbind", access, "nosuid", "nodev"],
        }
    if isinstance(operation, Tmpfs):
        options = [f"mode={operation.mode:o}", f"size={operation.size_bytes}"]
        return {
            "destination": operation.target,
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "nodev", *options],
        }
    if operation.kind == "proc":
        return {"destination": operation.target, "type": "proc", "source": "proc"}
    if operation.kind == "dev":
        options = ["nosuid", "strictatime", "mode=755", "size=65536k"]
        return {
            "destination": operation.target,
            "type": "tmpfs",
            "source": "tmpfs",
            "options": options,
        }
    return {
        "destination": operation.target,
        "type": "sysfs",
        "source": "sysfs",
        "options": ["nosuid", "noexec", "nodev", "ro"],
    }


def _mount_points(plan: SandboxPlan, lowers: list[Path], uid: int) -> Path:
    """A layer holding a mount point for each of the sandbox's binds, to lie on top of its
    image, with the metadata the image gives those paths (else the sandbox root's, 0755).

    runsc's Gofer makes the mount points of bind mounts in the root it is handed, which is the
    image, read-only and shared with other sandboxes. Made here, per sandbox, they need neither
    a writable image (a Gofer that can write into a layer every sandbox stacks) nor an image
    that happens to have them.
    """
    top = plan.dir / "mountpoints"
    top.mkdir(mode=0o755, exist_ok=True)
    _like(top, lowers, (), uid)  # the merged root takes its owner and mode from here
    for operation in plan.mounts():
        if not isinstance(operation, Bind):
            continue
        parts = PurePosixPath(operation.target).relative_to("/").parts
        path = top
        for depth, part in enumerate(parts):
            path = path / part
            if path.exists():
                continue
            if depth == len(parts) - 1 and not Path(operation.source).is_dir():
                path.touch(mode=0o644)
            else:
                path.mkdir(mode=0o755)
            _like(path, lowers, parts[: depth + 1], uid)
    return top


def _like(path: Path, lowers: list[Path], parts: tuple[str, ...], uid: int) -> None:
    """Give `path` the owner and mode of the image's own entry at `parts` (the topmost layer
    that has one), else the sandbox root's and what it was made with."""
    for lower in lowers:
        try:
            found = os.lstat(lower.joinpath(*parts))
        except OSError:
            continue
        if stat.S_ISDIR(found.st_mode) == path.is_dir() and not stat.S_ISLNK(found.st_mode):
            os.chown(path, found.st_uid, found.st_gid)
            path.chmod(stat.S_IMODE(found.st_mode))
            return
        break  # something else is there (a symlink, a file): ours lies on top of it
    os.chown(path, uid, uid)
